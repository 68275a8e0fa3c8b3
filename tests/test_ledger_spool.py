"""The spool and the batching writer: while the ledger is down or slow, records go to disk; when
it is back they are replayed, none lost and none counted twice, across restarts too."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.errors import LedgerError
from proxy.ledger.base import AggregateRow, Ledger
from proxy.ledger.spool import Spool, encode
from proxy.ledger.sqlite import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.metrics import Metrics
from proxy.records import RequestRecord
from tests.helpers.ledger_data import assert_same, random_records, record


class Flaky(Ledger):
    """A real SQLite ledger behind switches: down, slow, or applying a batch and then failing
    (the reply lost), or failing with an error the backend forgot to translate."""

    backend = "flaky"

    def __init__(self, inner: Ledger) -> None:
        self.inner = inner
        self.down = False
        self.reply_lost = False
        self.untranslated = False
        self.delay_s = 0.0
        self.calls = 0

    async def write(self, records: Sequence[RequestRecord]) -> int:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.untranslated:
            raise RuntimeError("driver bug")
        if self.down:
            raise LedgerError("connection refused")
        new = await self.inner.write(records)
        if self.reply_lost:
            raise LedgerError("connection reset before the reply")
        return new

    async def get(self, request_id: str) -> RequestRecord | None:
        return await self.inner.get(request_id)

    async def aggregates(
        self, start_day: str, end_day: str, user: str | None = None, team: str | None = None
    ) -> list[AggregateRow]:
        return await self.inner.aggregates(start_day, end_day, user, team)


@pytest.fixture
async def flaky(tmp_path: Path) -> AsyncIterator[Flaky]:
    inner = SQLiteLedger(str(tmp_path / "ledger.db"))
    await inner.open()
    yield Flaky(inner)
    await inner.close()


def writer_for(
    ledger: Ledger, spool: Spool | None, **kwargs: Any
) -> tuple[LedgerWriter, CollectorRegistry]:
    registry = CollectorRegistry()
    writer = LedgerWriter(ledger, Metrics(registry), batch_size=16, spool=spool, **kwargs)
    return writer, registry


def sample(registry: CollectorRegistry, name: str, backend: str = "flaky") -> float:
    value = registry.get_sample_value(name, {"backend": backend})
    return 0.0 if value is None else value


async def stored(ledger: Ledger) -> list[AggregateRow]:
    return await ledger.aggregates("2026-11-01", "2026-11-30")


def lines_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the spool file ------------------------------------------------------------------------------


def test_spool_round_trip_keeps_every_digit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s" / "spool.jsonl", 1 << 20)
    assert not spool.path.exists()
    recs = [record(f"p{i}", energy_j=1 / 3 + i, co2e_g=2 / 3 * 1e-7) for i in range(40)]
    assert spool.append(recs[:25]) == 25
    assert spool.append(recs[25:]) == 15
    assert spool.records == 40
    assert spool.size_bytes == spool.path.stat().st_size
    got = [r for batch, _, _ in spool.batches(16) for r in batch]
    assert [r.request_id for r in got] == [r.request_id for r in recs]
    assert [r.energy_j for r in got] == [r.energy_j for r in recs]
    assert [r.co2e_g for r in got] == [r.co2e_g for r in recs]
    spool.clear()
    assert not spool.path.exists()
    assert spool.records == 0
    assert spool.pending == 0


def test_spool_never_grows_past_max_bytes(tmp_path: Path) -> None:
    line_bytes = len(encode(record("s00")))
    spool = Spool(tmp_path / "spool.jsonl", 3 * line_bytes + 10)
    assert spool.append([record(f"s{i:02d}") for i in range(10)]) == 3
    assert spool.append([record("s99")]) == 0
    assert spool.path.stat().st_size <= spool.max_bytes
    assert spool.records == 3


def test_torn_last_line_is_cut_at_startup(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    first = Spool(path, 1 << 20)
    first.append([record("t1"), record("t2"), record("t3")])
    whole = path.stat().st_size
    with path.open("ab") as f:
        f.write(b'{"request_id":"t4","us')  # a crash in the middle of an append
    again = Spool(path, 1 << 20)
    assert again.records == 3
    assert path.stat().st_size == whole
    assert [r.request_id for b, _, _ in again.batches(10) for r in b] == ["t1", "t2", "t3"]


def test_unreadable_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    path.write_bytes(encode(record("u1")) + b"not json\n" + b"[1, 2]\n" + encode(record("u2")))
    spool = Spool(path, 1 << 20)
    assert spool.records == 4
    batches = list(spool.batches(10))
    assert [r.request_id for r in batches[0][0]] == ["u1", "u2"]
    assert batches[0][2] == 4
    assert spool.skipped_lines == 2


# -- the writer ----------------------------------------------------------------------------------


async def test_outage_goes_to_the_spool_and_is_replayed_once(flaky: Flaky, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    writer, registry = writer_for(flaky, spool)
    recs = random_records(50, seed=11)
    flaky.down = True
    for r in recs:
        writer.submit(r)
    assert sample(registry, "wattproxy_ledger_backlog_records") == 50
    assert await writer.flush() is False
    assert sample(registry, "wattproxy_ledger_errors_total") == 1
    assert [d["request_id"] for d in lines_of(spool.path)] == [r.request_id for r in recs]
    assert writer.backlog == 50
    assert sample(registry, "wattproxy_ledger_backlog_records") == 50
    assert await stored(flaky) == []

    later = random_records(5, seed=12, prefix="late")
    for r in later:
        writer.submit(r)
    assert writer.backlog == 55
    flaky.down = False
    assert await writer.flush() is True
    assert_same(await stored(flaky), recs + later)
    assert not spool.path.exists()
    assert writer.backlog == 0
    assert writer.written == 55
    assert sample(registry, "wattproxy_ledger_backlog_records") == 0


async def test_batches_applied_but_unacknowledged_are_not_counted_twice(
    flaky: Flaky, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    writer, _ = writer_for(flaky, spool)
    recs = random_records(40, seed=21)
    for r in recs:
        writer.submit(r)
    flaky.reply_lost = True
    assert await writer.flush() is False
    assert spool.records == 40  # the first batch was applied, but the writer cannot know
    assert sum(r.requests for r in await stored(flaky)) == 16
    flaky.reply_lost = False
    assert await writer.flush() is True
    assert_same(await stored(flaky), recs)


async def test_records_left_in_the_spool_are_replayed_after_a_restart(
    flaky: Flaky, tmp_path: Path
) -> None:
    path = tmp_path / "spool.jsonl"
    before, _ = writer_for(flaky, Spool(path, 1 << 20))
    recs = random_records(20, seed=31)
    for r in recs:
        before.submit(r)
    flaky.down = True
    assert await before.flush() is False
    del before  # the process stops with its records on disk

    flaky.down = False
    after, registry = writer_for(flaky, Spool(path, 1 << 20))
    assert after.backlog == 20
    assert sample(registry, "wattproxy_ledger_backlog_records") == 20
    assert await after.flush() is True
    assert_same(await stored(flaky), recs)
    assert not path.exists()


async def test_partial_replay_resumes_where_it_stopped(flaky: Flaky, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    writer, _ = writer_for(flaky, spool)
    recs = random_records(48, seed=41)
    flaky.down = True
    for r in recs:
        writer.submit(r)
    assert await writer.flush() is False
    flaky.down = False
    calls = flaky.calls
    original = flaky.write

    async def fail_on_second(records: Sequence[RequestRecord]) -> int:
        if flaky.calls == calls + 1:
            flaky.calls += 1
            raise LedgerError("dropped again")
        return await original(records)

    flaky.write = fail_on_second  # type: ignore[method-assign]
    assert await writer.flush() is False
    assert spool.replayed_records == 16
    assert writer.backlog == 32
    assert await writer.flush() is True
    assert_same(await stored(flaky), recs)


async def test_a_slow_backend_is_given_up_on_and_spooled(flaky: Flaky, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    writer, registry = writer_for(flaky, spool, write_timeout_s=0.1)
    recs = random_records(10, seed=51)
    for r in recs:
        writer.submit(r)
    flaky.delay_s = 5.0
    t0 = time.monotonic()
    assert await writer.flush() is False
    assert time.monotonic() - t0 < 2.0
    assert spool.records == 10
    assert sample(registry, "wattproxy_ledger_errors_total") == 1
    flaky.delay_s = 0.0
    assert await writer.flush() is True
    assert_same(await stored(flaky), recs)


async def test_a_full_spool_keeps_the_rest_in_memory(flaky: Flaky, tmp_path: Path) -> None:
    recs = random_records(30, seed=61)
    max_bytes = sum(len(encode(r)) for r in recs[:12])
    spool = Spool(tmp_path / "spool.jsonl", max_bytes)
    writer, _ = writer_for(flaky, spool)
    flaky.down = True
    for r in recs:
        writer.submit(r)
    assert await writer.flush() is False
    assert spool.records == 12
    assert writer.backlog == 30
    flaky.down = False
    assert await writer.flush() is True
    assert_same(await stored(flaky), recs)
    assert writer.backlog == 0


async def test_without_a_spool_memory_is_bounded(flaky: Flaky) -> None:
    writer, _ = writer_for(flaky, None, max_memory_records=10)
    flaky.down = True
    for r in random_records(15, seed=71):
        writer.submit(r)
    assert await writer.flush() is False
    assert writer.backlog == 10
    assert writer.dropped == 5


async def test_an_untranslated_error_does_not_kill_the_writer(flaky: Flaky, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    writer, registry = writer_for(flaky, spool)
    recs = random_records(5, seed=81)
    for r in recs:
        writer.submit(r)
    flaky.untranslated = True
    assert await writer.flush() is False
    assert sample(registry, "wattproxy_ledger_errors_total") == 1
    flaky.untranslated = False
    assert await writer.flush() is True
    assert_same(await stored(flaky), recs)


async def test_the_background_loop_recovers_on_its_own(flaky: Flaky, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    writer, _ = writer_for(flaky, spool, flush_interval_s=0.01)
    task = asyncio.create_task(writer.run())
    try:
        flaky.down = True
        recs = random_records(60, seed=91)
        for r in recs[:40]:
            writer.submit(r)
            await asyncio.sleep(0)
        deadline = time.monotonic() + 5
        while spool.records < 40 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert spool.records == 40
        flaky.down = False
        for r in recs[40:]:
            writer.submit(r)
        deadline = time.monotonic() + 10
        while writer.backlog and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert writer.backlog == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert_same(await stored(flaky), recs)
    assert not spool.path.exists()


def test_submit_never_touches_the_disk(tmp_path: Path) -> None:
    ledger = SQLiteLedger(str(tmp_path / "never.db"))
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    writer, _ = writer_for(ledger, spool)
    for r in random_records(100, seed=5):
        writer.submit(r)
    assert writer.backlog == 100
    assert not spool.path.exists()
    assert not (tmp_path / "never.db").exists()


async def test_the_writer_tells_what_the_ledger_stored_once_it_is_stored(
    flaky: Flaky, tmp_path: Path
) -> None:
    """Budgets count a final record locally until the ledger has it: the writer says when,
    for batches written at once and for spooled ones once replayed, never before."""
    told: list[str] = []
    spool = Spool(tmp_path / "spool.jsonl", 1 << 20)
    writer, _ = writer_for(
        flaky, spool, on_written=lambda records: told.extend(r.request_id for r in records)
    )
    first = random_records(20, seed=21, prefix="a")
    for r in first:
        writer.submit(r)
    assert await writer.flush() is True
    assert told == [r.request_id for r in first]

    told.clear()
    flaky.reply_lost = True  # applied, but the writer cannot know: not told
    later = random_records(5, seed=22, prefix="b")
    for r in later:
        writer.submit(r)
    assert await writer.flush() is False
    assert told == []
    flaky.reply_lost = False
    assert await writer.flush() is True  # replayed from the spool
    assert told == [r.request_id for r in later]
