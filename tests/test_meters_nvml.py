"""NvmlMeter against a pynvml stand-in with scripted counters (mJ) and power (mW)."""

from __future__ import annotations

import logging
import sys

import pytest

from estimators.errors import MeterError, MeterUnavailable
from estimators.meters import NvmlMeter
from estimators.meters.nvml import _Ret
from tests.fakes import fake_pynvml
from tests.fakes.fake_pynvml import FakeGpu, FakePynvml


class ManualClock:
    def __init__(self, t_s: float = 100.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


def two_gpus() -> FakePynvml:
    return FakePynvml(
        [
            FakeGpu("GPU-aaaaaaaa-0000-0000-0000-000000000000", energy_mj=1_000_000),
            FakeGpu("GPU-bbbbbbbb-1111-1111-1111-111111111111", energy_mj=2_000_000),
        ]
    )


def test_counter_path_reports_joules_since_open_and_interval_power() -> None:
    nvml, clock = two_gpus(), ManualClock()
    meter = NvmlMeter(nvml=nvml, clock=clock)
    assert meter.devices() == ["gpu0", "gpu1"]

    clock.t_s += 0.5
    nvml.gpus[0].draw_mj(150_000)  # 150 J in 0.5 s: 300 W
    nvml.gpus[1].draw_mj(40_000)
    reading = meter.read()

    assert reading.timestamp_s == 100.5
    assert reading.energy_j == {"gpu0": 150.0, "gpu1": 40.0}
    assert reading.power_w == {"gpu0": 300.0, "gpu1": 80.0}
    assert reading.errors == {}
    assert "power_usage" not in nvml.gpus[0].calls  # the counter alone suffices

    clock.t_s += 1.0
    nvml.gpus[0].draw_mj(250)
    assert meter.read().energy_j["gpu0"] == pytest.approx(150.25)


def test_power_field_path_integrates_by_trapezoid() -> None:
    nvml = FakePynvml([FakeGpu("GPU-old", energy_mj=None, power_mw=100_000)])
    clock = ManualClock(0.0)
    meter = NvmlMeter(nvml=nvml, clock=clock)

    clock.t_s, nvml.gpus[0].power_mw = 1.0, 200_000
    first = meter.read()
    clock.t_s, nvml.gpus[0].power_mw = 3.0, 250_000
    second = meter.read()

    assert first.energy_j == {"gpu0": 150.0}  # (100 W + 200 W) / 2 * 1 s
    assert second.energy_j == {"gpu0": 600.0}  # + (200 W + 250 W) / 2 * 2 s
    assert second.power_w == {"gpu0": 250.0}
    assert "field_values" in nvml.gpus[0].calls
    assert "power_usage" not in nvml.gpus[0].calls


def test_power_usage_fallback_when_the_driver_lacks_power_fields() -> None:
    nvml = FakePynvml([FakeGpu("GPU-older", energy_mj=None, power_fields=False, power_mw=50_000)])
    clock = ManualClock(0.0)
    meter = NvmlMeter(nvml=nvml, clock=clock)

    clock.t_s, nvml.gpus[0].power_mw = 2.0, 70_000
    reading = meter.read()

    assert reading.energy_j == {"gpu0": 120.0}  # (50 W + 70 W) / 2 * 2 s
    assert "power_usage" in nvml.gpus[0].calls


def test_counter_reset_is_absorbed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    nvml, clock = two_gpus(), ManualClock()
    meter = NvmlMeter({"gpu0": 0}, nvml=nvml, clock=clock)
    nvml.gpus[0].draw_mj(5_000)
    clock.t_s += 1
    assert meter.read().energy_j == {"gpu0": 5.0}

    nvml.gpus[0].energy_mj = 2_000  # GPU reset: the counter restarts near zero
    clock.t_s += 1
    with caplog.at_level(logging.WARNING, logger="wattproxy.meter.nvml"):
        reading = meter.read()

    assert reading.energy_j == {"gpu0": 7.0}
    assert reading.power_w["gpu0"] == pytest.approx(2.0)
    assert "counter went back" in caplog.text


def test_uuid_selects_the_gpu_whatever_its_index() -> None:
    nvml, clock = two_gpus(), ManualClock()
    meter = NvmlMeter({"big": "GPU-bbbbbbbb-1111-1111-1111-111111111111"}, nvml=nvml, clock=clock)
    nvml.gpus[0].draw_mj(9_000)
    nvml.gpus[1].draw_mj(3_000)
    clock.t_s += 1

    assert meter.devices() == ["big"]
    assert meter.read().energy_j == {"big": 3.0}


def test_mig_enabled_gpu_is_refused_with_a_pointer_to_dcgm() -> None:
    nvml = FakePynvml([FakeGpu("GPU-mig", mig_mode=[1, 1])])
    with pytest.raises(MeterError, match=r"MIG enabled.*meter.kind: dcgm"):
        NvmlMeter(nvml=nvml)
    assert nvml.init_count == 0  # NVML was shut down again


def test_gpu_without_mig_support_is_read() -> None:
    nvml = FakePynvml([FakeGpu("GPU-t4", mig_mode=None, energy_mj=10)])
    meter = NvmlMeter(nvml=nvml, clock=ManualClock())
    nvml.gpus[0].draw_mj(1_000)
    assert meter.read().energy_j == {"gpu0": 1.0}


def test_missing_devices_are_reported_per_device() -> None:
    nvml, clock = two_gpus(), ManualClock()
    meter = NvmlMeter({"gpu0": 0, "gpu7": 7, "ghost": "GPU-nope"}, nvml=nvml, clock=clock)
    nvml.gpus[0].draw_mj(1_000)
    clock.t_s += 1

    reading = meter.read()

    assert reading.energy_j == {"gpu0": 1.0}
    assert set(reading.errors) == {"gpu7", "ghost"}
    assert "Invalid Argument" in reading.errors["gpu7"]
    assert "Not Found" in reading.errors["ghost"]
    assert "nvidia-smi -L" in reading.errors["ghost"]


def test_a_lost_gpu_is_an_error_for_that_device_and_the_meter_recovers() -> None:
    nvml, clock = two_gpus(), ManualClock()
    meter = NvmlMeter(nvml=nvml, clock=clock)

    nvml.gpus[1].fail_with = fake_pynvml.NVML_ERROR_GPU_IS_LOST
    nvml.gpus[0].draw_mj(1_000)
    nvml.gpus[1].draw_mj(4_000)
    clock.t_s += 1
    failed = meter.read()
    assert failed.energy_j == {"gpu0": 1.0}
    assert "GPU is lost" in failed.errors["gpu1"]

    nvml.gpus[1].fail_with = None
    nvml.gpus[1].draw_mj(6_000)
    clock.t_s += 1
    recovered = meter.read()
    assert recovered.errors == {}
    assert recovered.energy_j["gpu1"] == 10.0  # nothing lost across the failed read


def test_nothing_readable_raises_then_reads_again() -> None:
    nvml, clock = two_gpus(), ManualClock()
    meter = NvmlMeter(nvml=nvml, clock=clock)
    for gpu in nvml.gpus:
        gpu.fail_with = fake_pynvml.NVML_ERROR_UNKNOWN

    with pytest.raises(MeterError, match=r"no GPU could be read.*gpu0.*gpu1"):
        meter.read()

    for gpu in nvml.gpus:
        gpu.fail_with = None
        gpu.draw_mj(2_000)
    clock.t_s += 1
    assert meter.read().energy_j == {"gpu0": 2.0, "gpu1": 2.0}


def test_open_fails_when_no_configured_gpu_exists() -> None:
    nvml = two_gpus()
    with pytest.raises(MeterError, match="none of the GPUs could be opened"):
        NvmlMeter({"gpu9": 9}, nvml=nvml)
    assert nvml.init_count == 0


def test_no_driver_is_unavailable() -> None:
    nvml = FakePynvml(library_found=False)
    with pytest.raises(MeterUnavailable, match=r"libnvidia-ml\.so"):
        NvmlMeter(nvml=nvml)
    assert not NvmlMeter.is_available(nvml)


def test_is_available_needs_a_gpu_and_leaves_nvml_shut_down() -> None:
    with_gpu, without = two_gpus(), FakePynvml([])
    assert NvmlMeter.is_available(with_gpu)
    assert not NvmlMeter.is_available(without)
    assert with_gpu.init_count == 0
    assert without.init_count == 0
    with pytest.raises(MeterUnavailable, match="sees no GPU"):
        NvmlMeter(nvml=without)


def test_without_nvidia_ml_py_the_meter_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` fail
    assert not NvmlMeter.is_available()
    with pytest.raises(MeterUnavailable, match="nvidia-ml-py"):
        NvmlMeter()


def test_close_shuts_nvml_down_once() -> None:
    nvml = two_gpus()
    meter = NvmlMeter(nvml=nvml)
    assert nvml.init_count == 1
    meter.close()
    meter.close()
    assert nvml.init_count == 0


def test_the_fake_matches_the_installed_pynvml() -> None:
    """Keeps the stand-in honest: same constants, functions and error-class mapping."""
    pynvml = pytest.importorskip("pynvml")
    fake = FakePynvml()
    for name in dir(fake_pynvml):
        if name.startswith("NVML_"):
            assert getattr(pynvml, name) == getattr(fake_pynvml, name), name
    for name in dir(FakePynvml):
        if name.startswith("nvml"):
            assert callable(getattr(pynvml, name)), name
    assert isinstance(pynvml.NVMLError(3), pynvml.NVMLError_NotSupported)
    assert isinstance(fake.NVMLError(3), fake_pynvml.NVMLError_NotSupported)  # type: ignore[attr-defined]
    assert str(fake.NVMLError(15)) == str(pynvml.NVMLError(15)) == "GPU is lost"


def test_the_meters_return_codes_match_the_installed_pynvml() -> None:
    pynvml = pytest.importorskip("pynvml")
    for code in _Ret:
        name = "NVML_SUCCESS" if code is _Ret.SUCCESS else f"NVML_ERROR_{code.name}"
        assert getattr(pynvml, name) == code, name
