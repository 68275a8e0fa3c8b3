"""Energy charged where it belongs (issue 12): at the accountant, with a scripted clock and
scripted meter readings, as the proxy drives it.

- an aborted request whose generation the server finishes keeps the energy of that work;
- a request whose upstream is gone stops drawing energy when the upstream failed;
- an answer for which the upstream did no work (4xx, 502, the proxy's own 502/504) is not
  charged for the time after its answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from estimators.attribution import AttributionEngine, IdlePolicy, Weighting
from estimators.estimator import Estimator
from estimators.meters.base import Reading
from proxy.accounting import Accountant, OpenRequest
from proxy.metrics import Metrics
from proxy.records import RequestRecord
from proxy.usage.base import Usage

IDLE_W = 60.0
SAMPLE_S = 0.1


@dataclass
class Bench:
    """An accountant on one metered device, a clock the test moves, and a meter whose power
    the test scripts (``busy_w(t)`` on top of ``IDLE_W``); readings every ``SAMPLE_S``."""

    busy_w: Callable[[float], float]
    t: float = 0.0
    energy_j: float = 0.0
    finals: dict[str, RequestRecord] = field(default_factory=dict)
    final_at: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.acc = Accountant(
            AttributionEngine(Weighting.WORK, IdlePolicy.EXCLUDE, idle_power_w=IDLE_W),
            Estimator(),
            Metrics(CollectorRegistry()),
            self._final,
            meter_devices=["gpu0"],
            meter_kind="nvml",
            clock=lambda: self.t,
        )
        self.acc.on_reading(Reading(0.0, {"gpu0": 0.0}, {}))
        self._next_sample_s = SAMPLE_S

    def _final(self, rec: RequestRecord) -> None:
        self.finals[rec.request_id] = rec
        self.final_at[rec.request_id] = self.t

    def until(self, t_s: float) -> None:
        """Advance the clock to ``t_s``, reading the meter at every sample time on the way."""
        while self._next_sample_s <= t_s + 1e-9:
            t = round(self._next_sample_s, 6)
            self.t = t
            mid = t - SAMPLE_S / 2
            self.energy_j += (IDLE_W + self.busy_w(mid)) * SAMPLE_S
            self.acc.on_reading(Reading(t, {"gpu0": self.energy_j}, {}))
            self._next_sample_s = round(self._next_sample_s + SAMPLE_S, 6)
        self.t = t_s

    def begin(self, rid: str, prompt: int, max_tokens: int | None = None) -> OpenRequest:
        rec = RequestRecord(rid, "alice", None, "llm", "llama", "text-generation", 0, "t")
        return self.acc.begin(rec, ["gpu0"], prompt, stream=True, max_tokens=max_tokens)

    def stream(self, req: OpenRequest, t0: float, t1: float, tokens_per_s: float) -> int:
        """First byte at ``t0`` (if not yet), then one token per 1/rate until ``t1``."""
        n = 0
        t = t0
        while t <= t1 + 1e-9:
            self.until(t)
            self.acc.first_byte(req)
            self.acc.tokens(req, 1)
            n += 1
            t = t0 + n / tokens_per_s
        return n


# -- 1. an aborted request whose work goes on ------------------------------------------------


def test_aborted_request_keeps_the_energy_until_the_server_stops() -> None:
    """llama.cpp finishes an aborted request's generation (~6 s here): a request queued behind
    it must not be charged that work (it was charged 94 % of it)."""
    bench = Bench(busy_w=lambda t: 200.0 if t < 9.0 else 0.0)
    a = bench.begin("A", 100, max_tokens=140)
    n = bench.stream(a, 0.05, 1.0, 20.0)
    bench.acc.end(a, 200, Usage(100, n, "estimate"), "client_disconnect")  # no final usage
    bench.until(1.5)
    b = bench.begin("B", 1000, max_tokens=40)
    bench.until(7.2)
    m = bench.stream(b, 7.2, 9.0, 20.0)
    bench.acc.end(b, 200, Usage(1000, m, "server"), "ok")
    bench.until(10.0)
    rec_a, rec_b = bench.finals["A"], bench.finals["B"]
    # A's work was 0-7 s (1,400 J at 200 W), B's 7-9 s (400 J)
    assert rec_a.energy_j >= 0.9 * 1400
    assert rec_b.energy_j <= 400 + 0.05 * 1200
    assert 6.9 <= bench.final_at["A"] <= 7.3  # final once its remaining work is done
    assert rec_a.source == "measured"
    assert rec_a.extra["linger_s"] == pytest.approx(6.0, abs=0.1)
    assert "client left" in (rec_a.basis or "")


def test_a_client_leaving_after_the_generation_was_complete_does_not_linger() -> None:
    """The server's final usage had arrived (or a whole non-streamed answer): nothing is left to
    compute, so the record is final at the next sample, as for any request."""
    bench = Bench(busy_w=lambda t: 200.0 if t < 1.0 else 0.0)
    a = bench.begin("A", 100, max_tokens=140)
    n = bench.stream(a, 0.05, 1.0, 20.0)
    bench.acc.end(a, 200, Usage(100, n, "server"), "client_disconnect")
    bench.until(1.1)
    assert "A" in bench.finals
    assert bench.finals["A"].basis == "measured"
    assert "linger_s" not in bench.finals["A"].extra


def test_an_aborted_request_closes_when_its_device_goes_quiet() -> None:
    """vLLM stops an aborted request at once: the device falls back to idle and the record is
    final there, not after the expected remaining work."""
    bench = Bench(busy_w=lambda t: 200.0 if t < 1.0 else 0.0)
    a = bench.begin("A", 100, max_tokens=140)
    n = bench.stream(a, 0.05, 1.0, 20.0)
    bench.acc.end(a, 200, Usage(100, n, "estimate"), "client_disconnect")
    bench.until(1.3)
    assert "A" in bench.finals
    assert bench.finals["A"].energy_j == pytest.approx(200.0)
