"""CPU package energy through Linux powercap (``intel-rapl``; AMD's RAPL is exposed there too).

Each domain folder has ``energy_uj`` (a µJ counter that wraps at ``max_energy_range_uj``) and
``name`` (``package-0``, ``psys``, ...). Wraparound is undone by ``EnergyCounter``; a counter
that wraps more than once between two reads cannot be told apart, which needs minutes at
hundreds of watts, far longer than any meter interval.

Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694, "Platypus"); a
``PermissionError`` is reported with that hint.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from estimators.errors import MeterError, MeterUnavailable
from estimators.meters.base import EnergyCounter, Meter, Reading, read_each
from estimators.units import UJ_PER_J

log = logging.getLogger("wattproxy.meter.rapl")

DEFAULT_ROOT = "/sys/class/powercap"

_TOP_LEVEL = re.compile(r"intel-rapl:([0-9]+)")  # not \d: it takes other scripts' digits
#: ``psys`` covers the whole platform, packages included: metering it too would count twice.
_SKIPPED_DOMAINS = frozenset({"psys"})
_PERMISSION_HINT = (
    "energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694); run as root or "
    "grant read access, e.g. chmod o+r or a udev rule on the powercap energy_uj files"
)


def top_level_domains(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """Every top-level ``intel-rapl:N`` folder under ``root``, by N, platform (psys) left out."""
    base = Path(root)
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _TOP_LEVEL.fullmatch(entry.name)
        if match and _domain_name(entry) not in _SKIPPED_DOMAINS:
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def _domain_name(path: Path) -> str:
    try:
        return (path / "name").read_text().strip()
    except OSError:
        return ""


def _read_uj(path: Path) -> int:
    """One µJ file, with errors translated into ``MeterError``."""
    try:
        return int(path.read_text().strip())
    except PermissionError as e:
        raise MeterError(f"rapl: cannot read {path}: {_PERMISSION_HINT}") from e
    except (OSError, ValueError) as e:
        raise MeterError(f"rapl: cannot read {path}: {e}") from e


@dataclass(slots=True)
class _Domain:
    """One powercap domain's counter; opened (``counter`` set) at its first good read."""

    path: Path
    counter: EnergyCounter | None = None
    last_energy_j: float = 0.0
    last_t_s: float = 0.0


class RaplMeter(Meter):
    """Cumulative energy of CPU packages, from powercap counters.

    Args:
        root: the powercap folder (``meter.rapl_root``); a fake tree in tests.
        devices: device name -> domain folder, absolute or relative to ``root``; default every
            top-level ``intel-rapl:N`` domain but psys, named cpu0, cpu1, ...
        clock: monotonic clock in seconds.

    Raises:
        MeterUnavailable: no RAPL domain under ``root``.
        MeterError: no domain could be read (typically permissions).
    """

    kind = "rapl"

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        devices: Mapping[str, str | Path] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = Path(root)
        self._clock = clock
        self._lock = threading.Lock()
        if devices:
            paths = {name: self._root / path for name, path in devices.items()}
        else:
            paths = {f"cpu{i}": path for i, path in enumerate(top_level_domains(self._root))}
        if not paths:
            raise MeterUnavailable(f"rapl: no intel-rapl domain under {self._root}")
        self._domains = {name: _Domain(path) for name, path in paths.items()}
        t_s = clock()
        problems: dict[str, str] = {}
        for name, domain in self._domains.items():
            try:
                self._sample(domain, t_s)  # the baseline: energy counts from here
            except MeterError as e:
                problems[name] = str(e)
                log.warning("%s cannot be read yet, will retry: %s", name, e)
        if len(problems) == len(self._domains):
            raise MeterError("rapl: no domain could be read: " + "; ".join(problems.values()))

    @classmethod
    def is_available(cls, root: str | Path = DEFAULT_ROOT) -> bool:
        """Whether some top-level domain's ``energy_uj`` can be read by this process."""
        for path in top_level_domains(root):
            try:
                _read_uj(path / "energy_uj")
            except MeterError:
                continue
            return True
        return False

    def devices(self) -> list[str]:
        return list(self._domains)

    def read(self) -> Reading:
        with self._lock:
            t_s = self._clock()
            domains = self._domains
            return read_each(
                "rapl", t_s, domains, lambda n: self._sample(domains[n], t_s), unit="domain"
            )

    def _sample(self, domain: _Domain, t_s: float) -> tuple[float, float | None]:
        """Cumulative joules and the average watts since the previous read."""
        if domain.counter is None:
            range_uj = _read_uj(domain.path / "max_energy_range_uj")
            counter = EnergyCounter(range_j=range_uj / UJ_PER_J)
            counter.update(_read_uj(domain.path / "energy_uj") / UJ_PER_J)
            domain.counter = counter
            domain.last_energy_j, domain.last_t_s = counter.total_j, t_s
            return counter.total_j, None
        energy_j = domain.counter.update(_read_uj(domain.path / "energy_uj") / UJ_PER_J)
        power_w = None
        if t_s > domain.last_t_s:
            power_w = (energy_j - domain.last_energy_j) / (t_s - domain.last_t_s)
        domain.last_energy_j, domain.last_t_s = energy_j, t_s
        return energy_j, power_w
