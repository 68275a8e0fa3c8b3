"""A deterministic power model standing in for a GPU, for the demo, tests and benchmarks.

Power = idle watts + for each request in flight, the dynamic watts of its task, with seeded
noise. The load (device -> task -> requests in flight) is read from a callback, so the model
follows the proxy's real traffic.
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

LoadFn = Callable[[], Mapping[str, Mapping[str, int]]]


class SimulatedMeter(Meter):
    """Integrates the power model between reads.

    Args:
        load: returns, per device, how many requests of each task are in flight.
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

    def devices(self) -> list[str]:
        return list(self._devices)

    def power_w(self, tasks: Mapping[str, int]) -> float:
        dynamic = sum(self._dynamic_w.get(task, 100.0) * n for task, n in tasks.items())
        return min(MAX_POWER_W, self._idle_w + dynamic)

    def read(self) -> Reading:
        load = self._load()
        with self._lock:
            now = self._clock()
            dt = max(0.0, now - self._last_t_s)
            self._last_t_s = now
            power: dict[str, float] = {}
            for device in self._devices:
                watts = self.power_w(load.get(device, {}))
                watts *= max(0.0, 1.0 + self._rng.gauss(0.0, self._noise))
                power[device] = watts
                self._energy_j[device] += watts * dt
            return Reading(timestamp_s=now, energy_j=dict(self._energy_j), power_w=power)
