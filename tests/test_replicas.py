"""Several proxy replicas on one Redis ledger, and Redis going away under load.

The replicas share the server on 127.0.0.1:6379 under a fresh key prefix (deleted afterwards).
The outage test stops and restarts a private redis-server of its own, never the shared one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import Parts
from proxy.config import Config
from proxy.ledger.redis import RedisLedger
from proxy.records import RequestRecord
from proxy.standins import StandIn
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.budget_burst import Gate, budget_config, burst, gated_app, request_g
from tests.helpers.ledger_data import assert_same
from tests.helpers.proxy_load import chat, settle
from tests.helpers.redis_server import (
    RedisServer,
    delete_prefix,
    new_prefix,
    shared_redis_available,
    shared_redis_url,
)

ADMIN_ENV = "WP_TEST_REPLICAS_ADMIN_TOKEN"


def replica_config(upstream: TestServer, tmp_path: Path, name: str, ledger_url: str) -> Config:
    """One replica: the shared ledger URL, its own spool file."""
    folder = tmp_path / name
    folder.mkdir()
    return proxy_config(
        url_of(upstream),
        folder,
        identity={"allow_header_identity": True},
        admin_token_env=ADMIN_ENV,
        ledger={
            "url": ledger_url,
            "flush_interval_ms": 20,
            "spool_path": str(folder / "spool.jsonl"),
        },
    )


def records_of(parts: Parts, rids: list[str]) -> list[RequestRecord]:
    found = [parts.recent.get(rid) for rid in rids]
    assert all(r is not None for r in found), "a served request has no final record"
    return [r for r in found if r is not None]


@pytest.fixture
def shared_prefix() -> Iterator[str]:
    if not shared_redis_available():
        pytest.skip("no Redis on 127.0.0.1:6379 (make test starts one: scripts/ensure-redis.sh)")
    prefix = new_prefix()
    yield prefix
    delete_prefix(prefix)


async def test_replicas_see_each_others_totals(
    make_proxy: ProxyFactory,
    upstream: TestServer,
    tmp_path: Path,
    shared_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ADMIN_ENV, raising=False)
    url = shared_redis_url(shared_prefix)
    (a, parts_a), (b, parts_b) = [
        await make_proxy(replica_config(upstream, tmp_path, name, url)) for name in ("a", "b")
    ]
    assert isinstance(parts_a.ledger, RedisLedger)
    assert parts_a.ledger is not parts_b.ledger
    sent: dict[str, list[str]] = {"a": [], "b": []}
    async with aiohttp.ClientSession() as session:
        for i in range(7):
            server, name = (a, "a") if i % 3 else (b, "b")
            status, rid, _ = await chat(session, url_of(server), user="alice", team="research")
            assert status == 200
            sent[name].append(rid)
        status, _, _ = await chat(session, url_of(b), user="bob")
        assert status == 200
        await settle(parts_a)
        await settle(parts_b)
        served = records_of(parts_a, sent["a"]) + records_of(parts_b, sent["b"])
        assert len(sent["a"]) == 4
        assert len(sent["b"]) == 3

        reports = []
        for server in (a, b):
            async with session.get(f"{url_of(server)}/v1/emissions/users/alice") as r:
                assert r.status == 200
                reports.append(await r.json())
        async with session.get(f"{url_of(a)}/v1/emissions/requests/{sent['b'][0]}") as r:
            assert r.status == 200  # recorded by b, read through a (from Redis)
            assert (await r.json())["user"] == "alice"

    for report in reports:
        assert report["totals"]["requests"] == 7
        assert report["totals"]["energy_j"] == pytest.approx(
            sum(r.energy_j for r in served), abs=1e-5
        )
        assert report["totals"]["co2e_g"] == pytest.approx(sum(r.co2e_g for r in served), abs=1e-8)
    assert reports[0]["totals"] == reports[1]["totals"]
    rows = await parts_a.ledger.aggregates("2000-01-01", "2100-01-01", team="research")
    assert_same(rows, served)


async def test_redis_stopped_under_load_loses_nothing_and_doubles_nothing(
    make_proxy: ProxyFactory,
    upstream: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not RedisServer.available():
        pytest.skip("redis-server is not installed (make test installs it: ensure-redis.sh)")
    monkeypatch.delenv(ADMIN_ENV, raising=False)
    with RedisServer(tmp_path / "redis") as redis_server:
        cfg = replica_config(upstream, tmp_path, "solo", redis_server.url)
        server, parts = await make_proxy(cfg)
        base = url_of(server)
        served: list[str] = []
        statuses: list[int] = []
        stop = asyncio.Event()

        async def load(user: str) -> None:
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    status, rid, _ = await chat(session, base, user=user)
                    statuses.append(status)
                    served.append(rid)
                    await asyncio.sleep(0.005)

        async def wait_for(condition: Any, what: str, timeout_s: float = 10.0) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while not condition():
                assert loop.time() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.02)

        workers = [asyncio.create_task(load(u)) for u in ("alice", "bob", "alice")]
        try:
            await wait_for(lambda: parts.writer.written >= 10, "records before the outage")
            redis_server.stop()
            served_at_stop = len(served)
            spool = parts.writer.spool
            assert spool is not None
            await wait_for(lambda: spool.records >= 10, "records spooled during the outage")
            await wait_for(lambda: len(served) >= served_at_stop + 20, "serving in the outage")
            redis_server.start()
            served_at_restart = len(served)
            await wait_for(lambda: len(served) >= served_at_restart + 10, "load after restart")
        finally:
            stop.set()
            await asyncio.gather(*workers)
        await settle(parts, timeout_s=30)

        assert set(statuses) == {200}  # serving never waited on the ledger
        assert len(set(served)) == len(served)
        reg = parts.metrics.registry
        errors = reg.get_sample_value("wattproxy_ledger_errors_total", {"backend": "redis"})
        assert errors is not None and errors >= 1
        assert reg.get_sample_value("wattproxy_ledger_backlog_records", {"backend": "redis"}) == 0
        assert not spool.path.exists()
        assert parts.writer.spooled >= 10

        records = records_of(parts, served)
        ledger = parts.ledger
        rows = await ledger.aggregates("2000-01-01", "2100-01-01")
        assert sum(r.requests for r in rows) == len(served)
        assert_same(rows, records)
        for user in ("alice", "bob"):
            mine = [r for r in records if r.user == user]
            assert_same(await ledger.aggregates("2000-01-01", "2100-01-01", user=user), mine)
        stored = await asyncio.gather(*(ledger.get(rid) for rid in served))
        assert all(s is not None for s in stored)
        # replaying everything once more changes nothing
        assert await ledger.write(records) == 0
        assert_same(await ledger.aggregates("2000-01-01", "2100-01-01"), records)


async def test_two_replicas_admitting_at_once_cannot_overshoot_a_budget(
    make_proxy: ProxyFactory,
    aiohttp_server: Any,
    standin: StandIn,
    tmp_path: Path,
    shared_prefix: str,
) -> None:
    """Each replica's reservation goes through Redis atomically: together they admit no more
    than one request past carol's budget, however the burst is split between them."""
    gate = Gate()
    upstream = await aiohttp_server(gated_app(standin, gate))
    e_g = request_g()
    budget_g = 4.5 * e_g
    url = shared_redis_url(shared_prefix)
    replicas = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        replicas.append(await make_proxy(budget_config(url_of(upstream), folder, budget_g, url)))

    statuses = await burst([url_of(server) for server, _ in replicas], 50, gate)
    for _, parts in replicas:
        await settle(parts)

    admitted = statuses.count(200)
    assert admitted + statuses.count(429) == 50
    assert admitted == gate.arrived == 5  # 4 held < 4.5 admits the fifth
    rows = await replicas[0][1].ledger.aggregates("2000-01-01", "2100-01-01", user="carol")
    admitted_g = sum(r.co2e_g for r in rows)
    assert admitted_g == pytest.approx(admitted * e_g)
    assert admitted_g <= budget_g + e_g
    for _, parts in replicas:
        assert parts.budgets is not None
        assert parts.budgets.reserved_g("user", "carol") == 0.0
