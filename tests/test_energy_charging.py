"""Energy charged where it belongs (issue 12): at the accountant, with a scripted clock and
scripted meter readings, as the proxy drives it.

- an aborted request whose generation the server finishes keeps the energy of that work;
- a request whose upstream is gone stops drawing energy when the upstream failed;
- an answer for which the upstream did no work (4xx, 502, the proxy's own 502/504) is not
  charged for the time after its answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from estimators.attribution import SILENT_AFTER_S, AttributionEngine, IdlePolicy, Weighting
from estimators.estimator import Estimator
from estimators.meters import Reading
from proxy.accounting import Accountant, OpenRequest
from proxy.metrics import Metrics
from proxy.records import RequestRecord
from proxy.usage.base import Usage
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.through_proxy import CHAT, final_record

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
            self._final,
            observer=Metrics(CollectorRegistry()),
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

    def begin(
        self, rid: str, prompt: int, max_tokens: int | None = None, model: str = "llama"
    ) -> OpenRequest:
        rec = RequestRecord(rid, "alice", None, "llm", model, "text-generation", 0, "t")
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


# -- 2. an upstream gone mid-stream ----------------------------------------------------------


@pytest.mark.parametrize("outcome", ["upstream_timeout", "upstream_reset"])
def test_a_request_whose_upstream_died_stops_drawing_when_it_failed(outcome: str) -> None:
    """4 tokens, then the upstream dies; the proxy learns of it 24 s later (the idle timeout,
    or a client slow to take the end of the stream) while the device goes on drawing for
    others. The record was 25 s and 3,867 J; it ends at the upstream's last token."""
    bench = Bench(busy_w=lambda t: 150.0)  # what the meter sees: not this request's work
    a = bench.begin("A", 100, max_tokens=140)
    n = bench.stream(a, 0.5, 0.8, 10.0)  # first byte 0.5, 4 tokens until 0.8
    assert n == 4
    bench.until(25.0)
    bench.acc.end(a, 200, Usage(100, n, "estimate"), outcome)
    bench.until(25.2)
    rec = bench.finals["A"]
    assert rec.duration_s == pytest.approx(0.8)
    # its life (0.8 s) and at most SILENT_AFTER_S of silence after its last token
    assert rec.energy_j <= 150.0 * (0.8 + SILENT_AFTER_S + SAMPLE_S) + 1e-6
    assert "linger_s" not in rec.extra
    assert bench.final_at["A"] == pytest.approx(25.1)  # at the next sample: it never lingers


async def test_through_the_proxy_an_upstream_that_dies_mid_stream_stops_being_charged(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Over loopback: the upstream sends 4 tokens and then hangs (killed where no reset
    reaches the proxy); the proxy gives up after ``idle_s``. The record's duration ends at the
    last token, and its energy is not the device's for the whole wait."""
    tokens = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i for i in range(4)
    )

    async def dies(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(tokens)
        await asyncio.sleep(30)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", dies)
    up = await aiohttp_server(app)
    idle_s = 2.5
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        upstreams=[{"name": "llm", "url": url_of(up), "timeouts": {"idle_s": idle_s}}],
    )
    proxy, _ = await make_proxy(cfg)
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        assert await r.content.readexactly(len(tokens)) == tokens
        with pytest.raises(aiohttp.ClientPayloadError):  # the proxy aborts, as the upstream
            await r.read()
        rid = r.headers["X-Request-Id"]
    rec = await final_record(url_of(proxy), rid)
    assert rec["outcome"] == "upstream_timeout"
    assert rec["completion_tokens"] == 4
    assert rec["duration_s"] < idle_s / 2  # the last token came at once, not after idle_s
    # the simulated GPU draws 150 W while the request is open: the whole wait would be
    # 375 J; the request keeps at most SILENT_AFTER_S of it after its last token
    assert rec["energy_j"] < 150.0 * idle_s * 0.6


# -- 3. answers for which the upstream did no work -------------------------------------------

NO_WORK = [
    pytest.param(400, "ok", True, id="400 context too long"),
    pytest.param(404, "ok", True, id="404 model not found"),
    pytest.param(422, "ok", True, id="422"),
    pytest.param(502, "upstream_error", True, id="502 from the upstream"),
    pytest.param(502, "upstream_unavailable", False, id="the proxy's 502"),
    pytest.param(504, "upstream_timeout", False, id="the proxy's 504"),
]


def _quick_answer(bench: Bench, status: int, outcome: str, answered: bool) -> None:
    """A streaming request S keeps the device busy; N, with a 200,000-token prompt, is answered
    at once (t=0.52 -> 0.56): its prompt's prefill would be released in that interval."""
    s = bench.begin("S", 10)
    bench.stream(s, 0.05, 0.5, 20.0)
    n = bench.begin("N", 200_000, model="too-long")
    bench.until(0.56)
    if answered:
        bench.acc.first_byte(n)
    bench.acc.end(n, status, Usage(200_000, 0, "estimate"), outcome)
    bench.stream(s, 0.6, 1.0, 20.0)
    bench.acc.end(s, 200, Usage(10, 20, "server"), "ok")
    bench.until(1.2)


@pytest.mark.parametrize(("status", "outcome", "answered"), NO_WORK)
def test_an_answer_without_upstream_work_is_not_charged(
    status: int, outcome: str, answered: bool
) -> None:
    """Its share of the interval of its answer goes to the request that did work (it took
    nearly all of it: its whole prompt's prefill was released at its answer)."""
    bench = Bench(busy_w=lambda t: 200.0)
    _quick_answer(bench, status, outcome, answered)
    n, s = bench.finals["N"], bench.finals["S"]
    assert n.energy_j == 0.0
    assert n.source == "measured"
    assert (n.basis or "").startswith(f"no work upstream (HTTP {status})")
    assert s.energy_j == pytest.approx(200.0 * 1.0)  # the work of 0-1 s is all S's
    # and N is no calibration sample (S is one)
    assert bench.acc.estimator.calibration.keys() == [("llm", "llama", "text-generation")]


def test_an_answer_without_upstream_work_alone_leaves_the_energy_unattributed() -> None:
    bench = Bench(busy_w=lambda t: 200.0)
    bench.until(0.52)
    n = bench.begin("N", 200_000)
    bench.until(0.56)
    bench.acc.first_byte(n)
    bench.acc.end(n, 404, Usage(200_000, 0, "estimate"), "ok")
    bench.until(0.7)
    assert bench.finals["N"].energy_j == 0.0
    totals = bench.acc.engine.devices["gpu0"]
    assert totals.no_requests_j == pytest.approx((IDLE_W + 200.0) * 0.7)  # idle included
    assert totals.attributed_j == 0.0


def test_the_proxys_504_keeps_only_what_was_measured_while_the_upstream_held_it() -> None:
    """The choice for answers without upstream work: nothing from the answer on; what the meter
    split while the upstream held the request (it may have been prefilling it) stays charged."""
    bench = Bench(busy_w=lambda t: 200.0)
    n = bench.begin("N", 200_000)
    bench.until(5.05)  # alone, waiting for a first byte that never comes
    bench.acc.end(n, 504, Usage(200_000, 0, "estimate"), "upstream_timeout")
    bench.until(5.5)
    assert bench.finals["N"].energy_j == pytest.approx(200.0 * 5.0)  # not 5.0-5.1 s
    assert "measured before its answer" in (bench.finals["N"].basis or "")


@pytest.mark.parametrize(
    ("status", "outcome"), [(500, "upstream_error"), (503, "upstream_error"), (504, "ok")]
)
def test_other_upstream_5xx_may_have_done_work_and_stay_measured(status: int, outcome: str) -> None:
    bench = Bench(busy_w=lambda t: 200.0)
    _quick_answer(bench, status, outcome, True)
    assert bench.finals["N"].energy_j > 0.0
    assert bench.finals["N"].basis == "measured"


def test_a_client_gone_before_any_answer_is_an_abort_not_an_answer() -> None:
    """The proxy's status is 502 until a response arrives: a client that leaves before it
    is an abort (its server may go on), not a 502 answer."""
    bench = Bench(busy_w=lambda t: 200.0)
    n = bench.begin("N", 100, max_tokens=40)
    bench.until(0.5)
    bench.acc.end(n, 502, Usage(100, 0, "estimate"), "client_disconnect")
    bench.until(1.0)
    assert "N" not in bench.finals  # lingering: 40 tokens at the assumed 20 tokens/s
    bench.until(2.7)
    assert bench.finals["N"].extra["linger_s"] == pytest.approx(2.0)


def test_an_unmetered_answer_without_upstream_work_is_not_charged() -> None:
    """Without a meter it was estimated (a text-generation prior of 169 J for a 404)."""
    finals: list[RequestRecord] = []
    acc = Accountant(AttributionEngine(), Estimator(), finals.append)
    rec = RequestRecord("N", "alice", None, "llm", "llama", "text-generation", 0, "t")
    req = acc.begin(rec, None, 20, stream=False)
    acc.first_byte(req)
    acc.end(req, 404, Usage(20, None, "estimate"), "ok")
    assert finals[0].energy_j == 0.0
    assert finals[0].source == "estimated"
    assert finals[0].basis == "no work upstream (HTTP 404): not charged"
