"""The Redis ledger over a real connection to the shared server on 127.0.0.1:6379.

Each test uses its own key prefix and deletes its keys afterwards; the server is never flushed
or stopped here (test_replicas stops a private server of its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.crc import key_slot

from proxy.errors import LedgerError
from proxy.ledger.base import PeriodLimit, open_ledger
from proxy.ledger.redis import MIN_AGGREGATE_RETENTION_DAYS, S_PER_DAY, RedisLedger
from tests.helpers.ledger_data import (
    DAYS,
    check_exactly_once,
    check_get,
    check_impacts_aggregated,
    check_totals_equal_records,
    random_records,
    record,
    sum_records,
)
from tests.helpers.redis_server import (
    SHARED_PORT,
    count_prefix,
    delete_prefix,
    free_port,
    new_prefix,
    shared_redis_available,
    shared_redis_url,
)

pytestmark = pytest.mark.skipif(
    not shared_redis_available(),
    reason="no Redis on 127.0.0.1:6379 (make test starts one: scripts/ensure-redis.sh)",
)


@pytest.fixture
def prefix() -> Iterator[str]:
    p = new_prefix()
    yield p
    delete_prefix(p)


@pytest.fixture
async def ledger(prefix: str) -> AsyncIterator[RedisLedger]:
    led = RedisLedger.from_url(shared_redis_url(prefix), retention_days=30)
    await led.open()
    yield led
    await led.close()


def sync_client() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=SHARED_PORT, decode_responses=True)


async def test_totals_equal_the_sum_of_records(ledger: RedisLedger) -> None:
    await check_totals_equal_records(ledger)


async def test_embodied_and_water_aggregated(ledger: RedisLedger) -> None:
    await check_impacts_aggregated(ledger)


async def test_retried_batches_count_once(ledger: RedisLedger) -> None:
    await check_exactly_once(ledger)


async def test_get_returns_the_stored_record(ledger: RedisLedger) -> None:
    await check_get(ledger)


async def test_concurrent_replicas_writing_the_same_batch_count_it_once(prefix: str) -> None:
    url = shared_redis_url(prefix)
    replicas = [RedisLedger.from_url(url) for _ in range(4)]
    records = random_records(120, seed=3)
    try:
        for led in replicas:
            await led.open()
        news = await asyncio.gather(*(led.write(records) for led in replicas))
        assert sum(news) == len(records)
        rows = await replicas[0].aggregates("2026-11-01", "2026-11-30")
        assert sum(r.requests for r in rows) == len(records)
        want = sum_records(records).energy_j
        assert sum(r.energy_j for r in rows) == pytest.approx(want, rel=1e-12)
    finally:
        for led in replicas:
            await led.close()


async def test_one_users_keys_share_one_cluster_slot(ledger: RedisLedger, prefix: str) -> None:
    odd = "we{ird}:user"
    day_budget = [PeriodLimit("day", 1.0, 0.0)]
    for scope, key in (("user", odd), ("team", "research")):  # a request in flight: held
        assert await ledger.reserve(scope, key, "s9", 0.1, day_budget, "2026-11-29", 60) is None
    await ledger.write(
        [
            record("s1", user=odd, day="2026-11-28"),
            record("s2", user=odd, day="2026-11-29"),
            record("s3", user="we", day="2026-11-29"),
        ]
    )
    client = sync_client()
    try:
        keys = sorted(client.scan_iter(match=f"{prefix}:*"))
        user_keys = [k for k in keys if "we%7Bird%7D%3Auser" in k]
        # two day hashes, the day index, two seen markers, the month's grams, the holds
        assert len(user_keys) == 8
        assert len({key_slot(k.encode()) for k in user_keys}) == 1
        other = [k for k in keys if ":{u:we}:" in k]
        assert len(other) == 4
        assert not set(other) & set(user_keys)
        assert all("{ird}" not in k for k in keys)
        # the team's: its users, three seen markers, the month's grams, the holds
        team_keys = [k for k in keys if ":{t:research}:" in k]
        assert len(team_keys) == 7
        assert len({key_slot(k.encode()) for k in team_keys}) == 1
    finally:
        client.close()


async def test_records_expire_with_retention_and_aggregates_later(
    ledger: RedisLedger, prefix: str
) -> None:
    await ledger.write([record("ttl-1")])
    client = sync_client()
    try:
        record_ttl = client.ttl(f"{prefix}:rec:ttl-1")
        day_ttl = client.ttl(f"{prefix}:{{u:alice}}:day:2026-11-29")
    finally:
        client.close()
    assert 30 * S_PER_DAY - 60 <= record_ttl <= 30 * S_PER_DAY
    assert day_ttl > MIN_AGGREGATE_RETENTION_DAYS * S_PER_DAY - 60


async def test_first_writer_of_a_request_id_keeps_the_record(ledger: RedisLedger) -> None:
    await ledger.write([record("dup", user="alice", co2e_g=0.5)])
    await ledger.write([record("dup", user="mallory", co2e_g=9.0)])
    got = await ledger.get("dup")
    assert got is not None
    assert got.user == "alice"


async def test_key_prefix_comes_from_the_url(prefix: str) -> None:
    led = open_ledger(shared_redis_url(prefix) + "&socket_keepalive=true")
    assert isinstance(led, RedisLedger)
    assert led.key_prefix == prefix
    assert "key_prefix" not in led.url
    assert "socket_keepalive=true" in led.url
    await led.open()
    try:
        await led.write([record("p-1")])
    finally:
        await led.close()
    assert count_prefix(prefix) > 0
    with pytest.raises(LedgerError, match="key_prefix"):
        RedisLedger.from_url("redis://127.0.0.1:6379/0?key_prefix={bad}")


def test_rediss_urls_use_tls() -> None:
    led = RedisLedger.from_url("rediss://127.0.0.1:6380/2")
    client = led._connect()
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert client.connection_pool.connection_kwargs["db"] == 2


async def test_a_server_that_is_not_there_raises_ledger_error() -> None:
    led = RedisLedger.from_url(f"redis://127.0.0.1:{free_port()}/0")
    await led.open()
    try:
        assert await led.ping() is False
        with pytest.raises(LedgerError, match="Redis ledger"):
            await led.write([record("down-1")])
        with pytest.raises(LedgerError):
            await led.get("down-1")
        with pytest.raises(LedgerError):
            await led.aggregates("2026-11-29", "2026-11-29")
        with pytest.raises(LedgerError):
            await led.used_g("user", "alice", "2026-11-29", "2026-11-29")
    finally:
        await led.close()


async def test_ping_answers_when_up(ledger: RedisLedger) -> None:
    assert await ledger.ping() is True


async def test_budget_counters_equal_the_records_and_count_retries_once(
    ledger: RedisLedger,
) -> None:
    """What ``reserve`` counts as used is what the records say, per user and per team, per day
    and per month, however often a batch is retried."""
    records = random_records(80, seed=5)
    assert await ledger.write(records) == len(records)
    assert await ledger.write(records) == 0

    async def used(scope: str, key: str, period: str, day: str, known_g: float = 0.0) -> float:
        # a budget of 0 g refuses every request and says what it counted
        refusal = await ledger.reserve(
            scope, key, "probe", 1.0, [PeriodLimit(period, 0.0, known_g)], day, 60
        )
        assert refusal is not None and refusal.reserved_g == 0.0
        return refusal.used_g

    for scope in ("user", "team"):
        owners = {r.user if scope == "user" else r.team for r in records} - {None}
        for owner in owners:
            mine = [r for r in records if (r.user if scope == "user" else r.team) == owner]
            for day in DAYS:
                want = sum(r.co2e_g for r in mine if r.day == day)
                assert await used(scope, str(owner), "day", day) == pytest.approx(want, rel=1e-9)
            month = sum(r.co2e_g for r in mine)
            assert await used(scope, str(owner), "month", DAYS[-1]) == pytest.approx(
                month, rel=1e-9
            )
    # grams the caller read from the aggregates count when the counters know less (an upgrade)
    assert await used("user", "alice", "day", "2026-12-01", known_g=7.5) == 7.5
