"""A deterministic power model standing in for a GPU, for the demo, tests and benchmarks.

Power = idle watts + for each request in flight, the dynamic watts of its task, with seeded
noise. The load is read from a callback as cumulative busy seconds (device -> task -> seconds
of requests in flight, summed over requests), so energy is integrated exactly between reads and
a request shorter than one interval still draws its share.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence

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


class SimulatedMeter(Meter):
    """Integrates the power model between reads.

    Args:
        load: returns, per device and task, cumulative seconds of requests in flight.
        devices: device names (default one device, ``gpu0``).
        idle_w: power with nothing in flight.
        dynamic_w: extra watts per in-flight request, by task.
        noise: relative standard deviation of the seeded multiplicative noise.
        clock: monotonic clock in seconds.
    """

    kind = "simulated"

    def __init__(
        self,
        load: LoadFn,
        devices: Sequence[str] = ("gpu0",),
        idle_w: float = DEFAULT_IDLE_W,
        dynamic_w: Mapping[str, float] | None = None,
        noise: float = 0.02,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
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
