"""The attribution engine at scale: one 100 ms meter sample on a device with 10,000 requests in
flight (target: under 10 ms). Shared by ``bench.run`` and the pytest-benchmark micro-benchmark
in ``tests/test_bench_attribution.py``."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from estimators.attribution import AttributionEngine, IdlePolicy, Weighting, WorkProfile

IN_FLIGHT = 10_000
DEVICE = "gpu0"
SAMPLE_S = 0.1
ENERGY_J = 45.0  # 450 W for 100 ms
IDLE_W = 60.0


def engine_with_flights(weighting: Weighting, in_flight: int = IN_FLIGHT) -> AttributionEngine:
    """``in_flight`` requests on one device, sampled once, ready for the next sample at
    ``2 * SAMPLE_S``: a quarter not streaming tokens, half past their first byte, a third with
    a token in the coming interval, 1 % ending in it."""
    engine = AttributionEngine(weighting, IdlePolicy.EXCLUDE, IDLE_W)
    engine.sample(DEVICE, 0.0, 0.0)
    for i in range(in_flight):
        profile = WorkProfile(
            prompt_tokens=float(50 + i % 2000),
            prefill_j_per_token=0.01,
            decode_j_per_token=0.3,
            expected_j=20.0,
            token_stream=i % 4 != 0,
        )
        engine.start(f"r{i}", [DEVICE], SAMPLE_S * i / in_flight, profile)
        if i % 2:
            engine.first_byte(f"r{i}", SAMPLE_S)
    engine.sample(DEVICE, SAMPLE_S, ENERGY_J)
    for i in range(0, in_flight, 3):
        engine.tokens(f"r{i}", 1)
    for i in range(0, in_flight, 100):
        engine.end(f"r{i}", 1.5 * SAMPLE_S)
    return engine


@dataclass(frozen=True, slots=True)
class SampleTiming:
    weighting: str
    in_flight: int
    median_ms: float
    min_ms: float


def time_sample(weighting: Weighting, rounds: int = 15) -> SampleTiming:
    """Wall time of one ``sample`` call, over ``rounds`` fresh engines."""
    times = []
    for _ in range(rounds):
        engine = engine_with_flights(weighting)
        t0 = time.perf_counter()
        engine.sample(DEVICE, 2 * SAMPLE_S, ENERGY_J)
        times.append(time.perf_counter() - t0)
    return SampleTiming(
        weighting.value, IN_FLIGHT, statistics.median(times) * 1e3, min(times) * 1e3
    )
