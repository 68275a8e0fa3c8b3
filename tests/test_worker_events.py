"""The workers' request events: their wire form, and the accounting process applying them. A
worker's ``RemoteAccountant`` writes its events through a real socket; applied by the hub's
``WorkerEvents`` to an ``Accountant`` they give the records one process gives for the same
requests at the same times, and a worker that is gone has its open requests closed once."""

from __future__ import annotations

import asyncio
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from estimators.attribution import AttributionEngine, IdlePolicy, Weighting
from estimators.estimator import Estimator, RequestShape
from estimators.meters import Reading
from proxy.accounting import Accountant, OpenRequest
from proxy.budgets import Budgets
from proxy.config import BudgetsConfig
from proxy.ledger.sqlite import SQLiteLedger
from proxy.records import RequestRecord
from proxy.usage.base import Usage
from proxy.workers import events
from proxy.workers.hub import (
    MAX_READING_LAG_S,
    PROXY_RESTART,
    READING_LAG_S,
    LaggedReadings,
    Lateness,
    WorkerEvents,
)
from proxy.workers.remote import EventChannel, RemoteAccountant


@dataclass
class Clock:
    t: float = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Node:
    """One accountant with a metered device (``gpu0``) and the records it finalized."""

    clock: Clock = field(default_factory=Clock)
    finals: list[RequestRecord] = field(default_factory=list)
    acc: Accountant = field(init=False)

    def __post_init__(self) -> None:
        self.acc = Accountant(
            AttributionEngine(Weighting.WORK, IdlePolicy.EXCLUDE, idle_power_w=50.0),
            Estimator(),
            self.finals.append,
            meter_devices=["gpu0"],
            meter_kind="nvml",
            clock=self.clock,
        )
        self.acc.on_reading(Reading(0.0, {"gpu0": 0.0}, {}))

    def read(self, t_s: float, total_j: float) -> None:
        self.clock.t = t_s
        self.acc.on_reading(Reading(t_s, {"gpu0": total_j}, {}))


def record(rid: str) -> RequestRecord:
    return RequestRecord(rid, "alice", "team-a", "llm", "m", "text-generation", 0, "t")


def test_a_batch_round_trips_through_its_line() -> None:
    batch = [
        [
            events.BEGIN,
            {"request_id": "a", "extra": {"é": [1, None]}},
            None,
            12,
            True,
            None,
            None,
            1.5,
        ],
        [events.TOKENS, "a", 3, 1.75],
        [events.END, "a", 200, {"prompt_tokens": 12}, "ok", {"k": "v\nw"}, 2.0],
    ]
    line = events.encode(batch)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one batch, one line
    assert events.decode(line) == batch
    with pytest.raises(ValueError):
        events.decode(b'{"not": "a list"}\n')


def test_usage_keeps_what_the_accounting_needs() -> None:
    usage = Usage(12, 30, "server", images=2, audio_s=1.25, model="whisper")
    back = events.usage_of(events.usage_doc(usage))
    assert (back.prompt_tokens, back.completion_tokens, back.tokens_source) == (12, 30, "server")
    assert (back.images, back.audio_s, back.model) == (2, 1.25, "whisper")
    assert events.usage_of({}).tokens_source == "none"


async def test_a_workers_events_give_the_records_of_one_process() -> None:
    direct = Node()
    remote_side = Node()
    a, b = socket.socketpair()
    reader_b, writer_b = await asyncio.open_connection(sock=b)
    _, writer_a = await asyncio.open_connection(sock=a)
    worker_clock = Clock()
    channel = EventChannel(writer_a, flush_s=0.0)
    worker = RemoteAccountant(channel, Estimator(), lambda upstream: 0.0, clock=worker_clock)
    applied = WorkerEvents(remote_side.acc, counters=_NoCounters(), clock=remote_side.clock)

    async def pump() -> None:
        """Everything the worker sent so far, applied (as the hub does)."""
        channel.flush()
        await writer_a.drain()
        await asyncio.sleep(0)
        while True:
            try:
                line = await asyncio.wait_for(reader_b.readline(), 0.05)
            except TimeoutError:
                return
            for event in events.decode(line):
                applied.apply(event)

    opened: dict[str, tuple[OpenRequest, OpenRequest]] = {}

    def step(t: float) -> None:
        direct.clock.t = worker_clock.t = t

    # two requests overlapping, the second one streaming more tokens
    for rid, t in (("r1", 0.01), ("r2", 0.03)):
        step(t)
        opened[rid] = (
            direct.acc.begin(record(rid), ["gpu0"], 20, True, 64),
            worker.begin(record(rid), ["gpu0"], 20, True, 64),
        )
    await pump()
    for rid, t, n in (("r1", 0.05, 4), ("r2", 0.06, 2), ("r1", 0.08, 6), ("r2", 0.09, 9)):
        step(t)
        d, w = opened[rid]
        direct.acc.first_byte(d)
        worker.first_byte(w)
        direct.acc.tokens(d, n)
        worker.tokens(w, n)
    await pump()
    for node in (direct, remote_side):
        node.read(0.1, 40.0)
    for rid, t in (("r1", 0.12), ("r2", 0.18)):
        step(t)
        d, w = opened[rid]
        usage = Usage(20, 10 if rid == "r1" else 11, "server")
        direct.acc.end(d, 200, usage)
        worker.end(w, 200, usage)
    await pump()
    for node in (direct, remote_side):
        node.read(0.2, 75.0)
    await channel.close()
    writer_b.close()

    assert len(direct.finals) == len(remote_side.finals) == 2
    by_id = {r.request_id: r for r in remote_side.finals}
    for rec in direct.finals:
        other = by_id[rec.request_id]
        assert other.energy_j == pytest.approx(rec.energy_j, rel=1e-12)
        assert rec.energy_j > 0 and rec.source == other.source == "measured"
        assert (other.completion_tokens, other.status, other.outcome) == (
            rec.completion_tokens,
            200,
            "ok",
        )
        assert other.duration_s == pytest.approx(rec.duration_s)
        assert other.ttfb_s == pytest.approx(rec.ttfb_s)
        assert other.extra["worker"] == 0
    total = sum(r.energy_j for r in remote_side.finals)
    assert math.isclose(total, sum(r.energy_j for r in direct.finals))


class _NoCounters:
    def route_decision(self, upstream: str, reason: str) -> None:
        raise AssertionError("not sent here")

    def budget_rejection(self, scope: str) -> None:
        raise AssertionError("not sent here")


def test_a_gone_worker_closes_its_open_requests_once_as_proxy_restart() -> None:
    node = Node()
    conn = WorkerEvents(node.acc, _NoCounters(), node.clock)
    for rid, t in (("done", 0.01), ("open", 0.02)):
        conn.apply(events.begin_event(record(rid), ["gpu0"], 20, True, 64, None, t))
        conn.apply([events.FIRST_BYTE, rid, 200, t + 0.01])
        conn.apply([events.TOKENS, rid, 5, t + 0.02])
    conn.apply([events.END, "done", 200, events.usage_doc(Usage(20, 5, "server")), "ok", {}, 0.05])
    node.clock.t = 0.07
    assert conn.close_all() == 1
    assert conn.close_all() == 0  # nothing left to close twice
    conn.apply([events.END, "open", 200, events.usage_doc(Usage()), "ok", {}, 0.08])  # too late
    node.read(0.2, 30.0)
    node.read(120.0, 6030.0)  # an aborted generation's expected rest is over by then (linger)
    finals = {r.request_id: r for r in node.finals}
    assert len(node.finals) == 2
    assert finals["done"].outcome == "ok"
    assert finals["open"].outcome == PROXY_RESTART and finals["open"].status == 200
    assert finals["open"].duration_s == pytest.approx(0.05)  # ended when the worker was gone
    assert sum(r.energy_j for r in node.finals) > 0


def test_a_begin_event_opens_the_record_the_worker_began() -> None:
    rec = RequestRecord(
        "r",
        "alice",
        "team-a",
        "llm",
        "m",
        "text-generation",
        0,
        "2026-12-03T16:00:00.000Z",
        end_user="eu-1",
        key_id="k1",
        extra={"client_request_id": "c", "route_reason": "least_carbon", "worker": 1},
    )
    event = events.decode(events.encode([events.begin_event(rec, None, 12, True, 64, 2, 3.5)]))
    back = events.record_of_begin(event[0])
    assert back == rec
    assert event[0][11:] == [None, 12, True, 64, 2, 3.5]


async def test_a_budget_check_holds_and_an_abandoned_admission_releases(tmp_path: Path) -> None:
    """A worker's budget check reserves the request's grams in the accounting process; when
    its client leaves before the request starts (``["r", id]``) the hold goes, since no
    record will release it."""
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"))
    await ledger.open()
    try:
        budgets = Budgets(
            BudgetsConfig.model_validate({"users": {"alice": {"grams_per_day": 10.0}}}),
            ledger,
            estimator=Estimator(),
            g_per_j=lambda upstream: 1e-4,
        )
        node = Node()
        conn = WorkerEvents(node.acc, _NoCounters(), node.clock, budgets=budgets)
        shape = events.shape_doc(RequestShape("llm", "m", "text-generation", 20, 64))
        conn.apply([events.BUDGET, 1, "alice", None, "r1", shape])
        await asyncio.sleep(0.05)
        assert budgets.reserved_g("user", "alice") > 0
        conn.apply([events.ABANDON, "r1"])
        assert budgets.reserved_g("user", "alice") == 0
    finally:
        await ledger.close()


def test_readings_wait_longer_while_events_arrive_late() -> None:
    """The lag is 0.1 s while events arrive on time, twice the recent worst lateness when they
    arrive later (a loaded machine), never past 2 s; an old stall is forgotten."""
    clock = Clock(100.0)
    lateness = Lateness(clock)
    assert lateness.reading_lag_s() == READING_LAG_S
    lateness.saw(99.99)  # 10 ms late
    assert lateness.reading_lag_s() == READING_LAG_S
    lateness.saw(99.7)  # 300 ms late
    assert lateness.reading_lag_s() == pytest.approx(0.6)
    lateness.saw(90.0)  # a 10 s stall
    assert lateness.reading_lag_s() == MAX_READING_LAG_S
    for _ in range(20_000):
        lateness.saw(clock.t)  # on time again
    assert lateness.reading_lag_s() == READING_LAG_S


async def test_lagged_readings_apply_in_order_once_due() -> None:
    applied: list[float] = []
    lags = iter([0.05, 0.0, 0.0])
    readings = LaggedReadings(lambda r: applied.append(r.timestamp_s), lambda: next(lags))
    for t in (1.0, 2.0, 3.0):
        readings(Reading(t, {"gpu0": t}, {}))
    await asyncio.sleep(0.01)
    assert applied == []  # the first is not due: the later ones wait behind it
    await asyncio.sleep(0.08)
    assert applied == [1.0, 2.0, 3.0]
    readings.immediate = True
    readings(Reading(4.0, {"gpu0": 4.0}, {}))
    assert applied == [1.0, 2.0, 3.0, 4.0]
