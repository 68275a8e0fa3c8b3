"""The meter interface: one ``read()`` returns cumulative joules per device.

Every backend (NVML, DCGM exporter, RAPL, simulated) turns its own counters or power gauges into
energy that only grows: wraparound and counter resets are absorbed here, in ``EnergyCounter``,
so attribution downstream only ever sees non-negative interval deltas.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from estimators.errors import MeterError


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of every device.

    Args:
        timestamp_s: monotonic clock (``time.monotonic``) at the read.
        energy_j: cumulative joules per device since the meter opened; devices that failed are
            absent here and present in ``errors``.
        power_w: the latest power per device, where the backend knows it.
        errors: device -> reason, for devices that could not be read this time.
    """

    timestamp_s: float
    energy_j: Mapping[str, float]
    power_w: Mapping[str, float] = field(default_factory=dict)
    errors: Mapping[str, str] = field(default_factory=dict)


#: One device's sample: cumulative joules, and the latest power in watts when known.
Sample = tuple[float, float | None]
#: A GPU as ``meter.devices`` names it: its index (int: NVML's index, dcgm-exporter's ``gpu``
#: label) or its UUID (str, ``GPU-...``: the ``UUID`` label).
GpuSelector = int | str


def read_each(
    kind: str,
    t_s: float,
    names: Iterable[str],
    sample: Callable[[str], Sample],
    unit: str = "device",
) -> Reading:
    """Sample every device; one that fails goes to ``errors`` and the rest are still read.
    Raises ``MeterError`` only when no device could be read."""
    energy: dict[str, float] = {}
    power: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            energy_j, power_w = sample(name)
        except MeterError as e:
            errors[name] = str(e)
            continue
        energy[name] = energy_j
        if power_w is not None:
            power[name] = power_w
    if not energy:
        raise MeterError(
            f"{kind}: no {unit} could be read: "
            + "; ".join(f"{name}: {reason}" for name, reason in errors.items())
        )
    return Reading(timestamp_s=t_s, energy_j=energy, power_w=power, errors=errors)


class Meter(abc.ABC):
    """A source of cumulative device energy. ``read`` may block: the sampler runs it in a thread."""

    kind: str = "abstract"

    @abc.abstractmethod
    def devices(self) -> list[str]:
        """Names of the devices this meter reads (``gpu0``, ``gpu1``, ...)."""

    @abc.abstractmethod
    def read(self) -> Reading:
        """Read every device once. Raises ``MeterError`` only if nothing could be read."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles (NVML shutdown, HTTP sessions)."""


class EnergyCounter:
    """Turns a raw hardware energy counter into monotonic cumulative joules.

    Handles wraparound when the counter's range is known (RAPL's ``max_energy_range_uj``) and
    resets otherwise (a driver reload restarts NVML's counter near zero): the energy after a reset
    is taken as the new raw value, counted from zero.
    """

    __slots__ = ("_last_raw_j", "_range_j", "resets", "total_j")

    def __init__(self, range_j: float | None = None) -> None:
        self._range_j = range_j
        self._last_raw_j: float | None = None
        self.total_j = 0.0
        self.resets = 0

    def update(self, raw_j: float) -> float:
        """Feed one raw reading (joules); returns the cumulative total."""
        last = self._last_raw_j
        self._last_raw_j = raw_j
        if last is None:
            return self.total_j
        delta = raw_j - last
        if delta < 0:
            if self._range_j is not None and self._range_j > 0:
                delta = raw_j + self._range_j - last
            else:
                self.resets += 1
                delta = raw_j
        self.total_j += delta
        return self.total_j


class PowerIntegrator:
    """Integrates power samples (W) over monotonic time (s) by the trapezoid rule."""

    __slots__ = ("_last_power_w", "_last_t_s", "total_j")

    def __init__(self) -> None:
        self._last_t_s: float | None = None
        self._last_power_w = 0.0
        self.total_j = 0.0

    def update(self, t_s: float, power_w: float) -> float:
        if self._last_t_s is not None and t_s > self._last_t_s:
            self.total_j += (t_s - self._last_t_s) * (power_w + self._last_power_w) / 2.0
        if self._last_t_s is None or t_s >= self._last_t_s:
            self._last_t_s = t_s
            self._last_power_w = power_w
        return self.total_j
