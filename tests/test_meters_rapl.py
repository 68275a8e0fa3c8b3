"""RaplMeter against a powercap tree in a temp dir, laid out as /sys/class/powercap is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from estimators.errors import MeterError, MeterUnavailable
from estimators.meters import RaplMeter
from estimators.meters.rapl import top_level_domains

MAX_UJ = 262_143_328_850  # a Xeon package's max_energy_range_uj


class ManualClock:
    def __init__(self, t_s: float = 100.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


def zone(root: Path, folder: str, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (path / "enabled").write_text("1\n")
    return path


def set_uj(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two sockets with core/dram subzones, a psys zone, the control type and an MMIO zone."""
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)
    (root / "intel-rapl" / "enabled").write_text("1\n")
    zone(root, "intel-rapl:0", "package-0", 10_000_000)
    zone(root, "intel-rapl:0:0", "core", 5_000_000)
    zone(root, "intel-rapl:0:1", "dram", 1_000_000)
    zone(root, "intel-rapl:1", "package-1", 20_000_000)
    zone(root, "intel-rapl:1:0", "core", 6_000_000)
    zone(root, "intel-rapl:2", "psys", 90_000_000)
    zone(root, "intel-rapl-mmio:0", "package-0", 10_000_000)
    return root


def test_default_devices_are_the_packages(powercap: Path) -> None:
    assert top_level_domains(powercap) == [powercap / "intel-rapl:0", powercap / "intel-rapl:1"]
    meter = RaplMeter(powercap, clock=ManualClock())
    assert meter.devices() == ["cpu0", "cpu1"]


def test_a_zone_numbered_in_other_digits_is_no_package(powercap: Path) -> None:
    zone(powercap, "intel-rapl:\u0663", "package-3", 1_000)  # an Arabic-Indic three
    assert top_level_domains(powercap) == [powercap / "intel-rapl:0", powercap / "intel-rapl:1"]


def test_counter_deltas_become_joules_and_watts(powercap: Path) -> None:
    clock = ManualClock()
    meter = RaplMeter(powercap, clock=clock)

    set_uj(powercap / "intel-rapl:0", 10_000_000 + 45_000_000)  # 45 J
    set_uj(powercap / "intel-rapl:1", 20_000_000 + 12_500_000)
    clock.t_s += 0.5
    reading = meter.read()

    assert reading.timestamp_s == 100.5
    assert reading.energy_j == {"cpu0": 45.0, "cpu1": 12.5}
    assert reading.power_w == {"cpu0": 90.0, "cpu1": 25.0}
    assert reading.errors == {}


def test_wraparound_at_max_energy_range(powercap: Path) -> None:
    package = powercap / "intel-rapl:0"
    set_uj(package, MAX_UJ - 3_000_000)  # 3 J before the wrap
    clock = ManualClock()
    meter = RaplMeter(powercap, {"cpu0": package}, clock=clock)

    set_uj(package, 2_000_000)  # wrapped, then 2 J more
    clock.t_s += 1.0
    reading = meter.read()

    assert reading.energy_j == {"cpu0": 5.0}
    assert reading.power_w == {"cpu0": 5.0}


def test_path_selectors_absolute_or_relative_to_root(powercap: Path) -> None:
    meter = RaplMeter(
        powercap,
        {"socket1": powercap / "intel-rapl:1", "dram0": "intel-rapl:0:1"},
        clock=ManualClock(),
    )
    set_uj(powercap / "intel-rapl:1", 20_000_000 + 1_000_000)
    set_uj(powercap / "intel-rapl:0:1", 1_000_000 + 250_000)

    assert meter.read().energy_j == {"socket1": 1.0, "dram0": 0.25}


def test_missing_domain_is_an_error_until_it_appears(powercap: Path) -> None:
    clock = ManualClock()
    meter = RaplMeter(powercap, {"cpu0": "intel-rapl:0", "cpu3": "intel-rapl:3"}, clock=clock)
    set_uj(powercap / "intel-rapl:0", 10_000_000 + 1_000_000)
    clock.t_s += 1

    reading = meter.read()
    assert reading.energy_j == {"cpu0": 1.0}
    assert "intel-rapl:3/max_energy_range_uj" in reading.errors["cpu3"]

    zone(powercap, "intel-rapl:3", "package-3", 7_000_000)
    clock.t_s += 1
    assert meter.read().energy_j == {"cpu0": 1.0, "cpu3": 0.0}  # counted from its first read
    set_uj(powercap / "intel-rapl:3", 7_000_000 + 3_000_000)
    clock.t_s += 1
    assert meter.read().energy_j["cpu3"] == 3.0


def test_a_failed_read_loses_no_energy(powercap: Path) -> None:
    clock = ManualClock()
    meter = RaplMeter(powercap, clock=clock)
    package = powercap / "intel-rapl:1"

    (package / "energy_uj").write_text("")  # a torn read
    clock.t_s += 1
    failed = meter.read()
    assert "cpu1" not in failed.energy_j
    assert "cannot read" in failed.errors["cpu1"]

    set_uj(package, 20_000_000 + 8_000_000)
    clock.t_s += 1
    assert meter.read().energy_j["cpu1"] == 8.0


def test_nothing_readable_raises(powercap: Path) -> None:
    meter = RaplMeter(powercap, {"cpu0": "intel-rapl:0"}, clock=ManualClock())
    (powercap / "intel-rapl:0" / "energy_uj").unlink()
    with pytest.raises(MeterError, match="no domain could be read"):
        meter.read()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_root_only_counters_get_a_permission_hint(powercap: Path) -> None:
    for path in top_level_domains(powercap):
        (path / "energy_uj").chmod(0)  # as a non-root process sees 0400 root-owned files
    assert not RaplMeter.is_available(powercap)
    with pytest.raises(MeterError, match="CVE-2020-8694"):
        RaplMeter(powercap)


def test_is_available(powercap: Path, tmp_path: Path) -> None:
    assert RaplMeter.is_available(powercap)
    assert not RaplMeter.is_available(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert not RaplMeter.is_available(tmp_path / "empty")
    with pytest.raises(MeterUnavailable, match="no intel-rapl domain"):
        RaplMeter(tmp_path / "empty")
