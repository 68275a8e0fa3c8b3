"""A deterministic power model standing in for a GPU, for the demo, tests and benchmarks.

Power = idle watts + for each request in flight, the dynamic watts of its task, with seeded
noise. The load is read from a callback as cumulative busy seconds (device -> task -> seconds
of requests in flight, summed over requests), so energy is integrated exactly between reads and
a request shorter than one interval still draws its share. ``LoadTracker`` keeps those seconds:
the proxy tells it when a request starts and ends on its devices, the meter reads it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from estimators.meters.base import Meter, Reading

# Dynamic watts one request of each task adds on an A100-class GPU while in flight. Chosen so
# that, with the demo's latencies, energy per request lands near Power Hungry Processing's means.
DEFAULT_DYNAMIC_W: dict[str, float] = {
    "text-classification": 60.0,
    "token-classification": 70.0,
    "fill-mask": 60.0,
    "question-answering": 70.0,
    "feature-extraction": 60.0,
    "image-classification": 80.0,
    "object-detection": 120.0,
    "text-generation": 150.0,
    "summarization": 150.0,
    "translation": 150.0,
    "image-to-text": 160.0,
    "text-to-image": 250.0,
}
DEFAULT_IDLE_W = 60.0
MAX_POWER_W = 700.0  # an H100 SXM's board limit: the model never exceeds it

LoadFn = Callable[[], Mapping[str, Mapping[str, float]]]


class LoadTracker:
    """Cumulative request-seconds per device and task: the simulated meter's load.

    Told of request starts and ends from the event loop, read by the meter from its thread
    (hence the lock). Calling it returns device -> task -> cumulative seconds of requests in
    flight, up to now.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, dict[str, int]] = {}
        self._busy_s: dict[str, dict[str, float]] = {}
        self._t_s: dict[str, float] = {}

    def started(self, devices: Iterable[str], task: str, t_s: float) -> None:
        self._change(devices, task, +1, t_s)

    def ended(self, devices: Iterable[str], task: str, t_s: float) -> None:
        self._change(devices, task, -1, t_s)

    def __call__(self) -> dict[str, dict[str, float]]:
        now = self._clock()
        with self._lock:
            for device in self._in_flight:
                self._advance(device, now)
            return {d: dict(b) for d, b in self._busy_s.items()}

    def _change(self, devices: Iterable[str], task: str, delta: int, t_s: float) -> None:
        with self._lock:
            for d in devices:
                self._advance(d, t_s)
                counts = self._in_flight.setdefault(d, {})
                counts[task] = counts.get(task, 0) + delta

    def _advance(self, device: str, now: float) -> None:
        last = self._t_s.get(device, now)
        self._t_s[device] = now
        if now > last:
            busy = self._busy_s.setdefault(device, {})
            for task, n in self._in_flight.get(device, {}).items():
                if n > 0:
                    busy[task] = busy.get(task, 0.0) + n * (now - last)


class SimulatedMeter(Meter):
    """Integrates the power model between reads.

    Args:
        load: returns, per device and task, cumulative seconds of requests in flight; by
            default a ``LoadTracker`` of its own (``tracker``), for the proxy to tell.
        devices: device names (default one device, ``gpu0``).
        idle_w: power with nothing in flight.
        dynamic_w: extra watts per in-flight request, by task.
        noise: relative standard deviation of the seeded multiplicative noise.
        clock: monotonic clock in seconds.
    """

    kind = "simulated"

    def __init__(
        self,
        load: LoadFn | None = None,
        devices: Sequence[str] = ("gpu0",),
        idle_w: float = DEFAULT_IDLE_W,
        dynamic_w: Mapping[str, float] | None = None,
        noise: float = 0.02,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load: LoadFn = load if load is not None else LoadTracker(clock)
        self._devices = list(devices)
        self._idle_w = idle_w
        self._dynamic_w = dict(DEFAULT_DYNAMIC_W if dynamic_w is None else dynamic_w)
        self._noise = noise
        self._rng = random.Random(seed)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_t_s = clock()
        self._energy_j = dict.fromkeys(self._devices, 0.0)
        self._busy_s: dict[str, dict[str, float]] = {d: {} for d in self._devices}

    @property
    def tracker(self) -> LoadTracker | None:
        """The tracker its load comes from, for the proxy to tell of requests (if it has one)."""
        return self._load if isinstance(self._load, LoadTracker) else None

    def devices(self) -> list[str]:
        return list(self._devices)

    def dynamic_j(self, busy_delta_s: Mapping[str, float]) -> float:
        return sum(self._dynamic_w.get(task, 100.0) * s for task, s in busy_delta_s.items())

    def read(self) -> Reading:
        load = self._load()
        with self._lock:
            now = self._clock()
            dt = max(0.0, now - self._last_t_s)
            self._last_t_s = now
            power: dict[str, float] = {}
            for device in self._devices:
                busy = load.get(device, {})
                last = self._busy_s[device]
                delta = {t: max(0.0, v - last.get(t, 0.0)) for t, v in busy.items()}
                self._busy_s[device] = dict(busy)
                energy_j = self._idle_w * dt + self.dynamic_j(delta)
                if dt > 0:
                    energy_j = min(energy_j, MAX_POWER_W * dt)
                energy_j *= max(0.0, 1.0 + self._rng.gauss(0.0, self._noise))
                power[device] = energy_j / dt if dt > 0 else self._idle_w
                self._energy_j[device] += energy_j
            return Reading(timestamp_s=now, energy_j=dict(self._energy_j), power_w=power)
