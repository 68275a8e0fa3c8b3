"""The simulated meter's load: ``LoadTracker`` counts request-seconds per device and task as the
proxy tells it of starts and ends, and the meter integrates its power model over them."""

from __future__ import annotations

import pytest

from estimators.meters import LoadTracker, SimulatedMeter
from estimators.meters.simulated import DEFAULT_IDLE_W


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_tracker_counts_seconds_of_requests_in_flight() -> None:
    clock = Clock()
    tracker = LoadTracker(clock)
    assert tracker() == {}
    tracker.started(("gpu0",), "text-generation", 1.0)
    tracker.started(("gpu0", "gpu1"), "text-generation", 2.0)
    tracker.ended(("gpu0",), "text-generation", 3.0)  # the first one
    clock.t = 5.0
    assert tracker() == {
        "gpu0": {"text-generation": pytest.approx(1.0 + 2 * 1.0 + 2.0)},
        "gpu1": {"text-generation": pytest.approx(3.0)},
    }
    tracker.ended(("gpu0", "gpu1"), "text-generation", 5.0)
    clock.t = 9.0
    assert tracker()["gpu0"]["text-generation"] == pytest.approx(5.0)  # nothing since


def test_meter_draws_its_own_trackers_load() -> None:
    clock = Clock()
    meter = SimulatedMeter(noise=0.0, dynamic_w={"text-generation": 100.0}, clock=clock)
    assert meter.tracker is not None
    meter.tracker.started(("gpu0",), "text-generation", 0.0)
    clock.t = 2.0
    reading = meter.read()
    assert reading.energy_j["gpu0"] == pytest.approx(2.0 * DEFAULT_IDLE_W + 2.0 * 100.0)
    assert SimulatedMeter(lambda: {}).tracker is None  # a load given: no tracker of its own
