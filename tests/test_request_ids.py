"""Request ids: the proxy keys records, ledgers, budgets and attribution by ids it makes itself,
so a client that reuses an ``X-Request-Id`` cannot drop its own requests from the ledger (and
from its budget); a client's plain id is kept in the record as ``client_request_id``. With
``identity.trust_request_id`` (behind a gateway that issues unique ids) the client's id is the
key, unless a request with that id is in flight in this process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from estimators.meters import Reading, SimulatedMeter
from proxy.app import FORWARDER
from proxy.ledger.base import Ledger
from proxy.standins import StandIn
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.budget_burst import CHAT_16, Gate, budget_config, gated_app, request_g
from tests.helpers.proxy_load import settle
from tests.helpers.redis_server import (
    delete_prefix,
    new_prefix,
    shared_redis_available,
    shared_redis_url,
)

#: An env var that is never set: the emissions API is open, as with no admin token.
ADMIN_ENV = "WP_TEST_REQUEST_IDS_ADMIN_TOKEN"
E_G = request_g()  # grams of one request of CHAT_16 on the budget config's grid


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    if not shared_redis_available():
        pytest.skip("no Redis on 127.0.0.1:6379 (make test starts one: scripts/ensure-redis.sh)")
    prefix = new_prefix()
    yield prefix
    delete_prefix(prefix)


def ledger_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    if backend == "sqlite":
        return None
    return shared_redis_url(request.getfixturevalue("redis_prefix"))


async def post_chat(
    session: aiohttp.ClientSession, base: str, client_id: str | None, user: str = "carol"
) -> tuple[int, str]:
    """One chat request as ``user``, sending ``client_id`` as X-Request-Id: (status, the id the
    proxy answered with)."""
    headers = {"X-Wattproxy-User": user}
    if client_id is not None:
        headers["X-Request-Id"] = client_id
    async with session.post(f"{base}/v1/chat/completions", json=CHAT_16, headers=headers) as r:
        await r.read()
        return r.status, r.headers["X-Request-Id"]


async def user_report(session: aiohttp.ClientSession, base: str, user: str) -> dict[str, Any]:
    async with session.get(f"{base}/v1/emissions/users/{user}") as r:
        assert r.status == 200, await r.text()
        doc: dict[str, Any] = await r.json()
        return doc


async def used_today(ledger: Ledger, user: str) -> tuple[int, float]:
    day = datetime.now(UTC).date().isoformat()
    rows = await ledger.aggregates(day, day, user=user)
    return sum(r.requests for r in rows), sum(r.co2e_g for r in rows)


# -- a client that sends the same id every time -------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_reused_request_id_cannot_hide_requests_from_the_ledger_or_the_budget(
    make_proxy: ProxyFactory,
    upstream: TestServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    cfg = budget_config(
        url_of(upstream),
        tmp_path,
        2.5 * E_G,  # room for three requests: the fourth is refused
        ledger_url(backend, request),
        admin_token_env=ADMIN_ENV,
    )
    server, parts = await make_proxy(cfg)
    base = url_of(server)
    async with aiohttp.ClientSession() as s:
        answers = []
        for _ in range(3):
            answers.append(await post_chat(s, base, "same-id"))
            await settle(parts)  # each one final and stored before the next one is sent
        assert [status for status, _ in answers] == [200, 200, 200]
        ids = [rid for _, rid in answers]
        assert len(set(ids)) == 3 and "same-id" not in ids
        for rid in ids:
            rec = await parts.ledger.get(rid)
            assert rec is not None, rid
            assert rec.user == "carol"
            assert rec.extra["client_request_id"] == "same-id"
        assert await parts.ledger.get("same-id") is None  # never a key
        assert await used_today(parts.ledger, "carol") == (3, pytest.approx(3 * E_G))
        report = await user_report(s, base, "carol")
        assert report["totals"]["requests"] == 3
        assert report["totals"]["co2e_g"] == pytest.approx(3 * E_G)
        # the budget was charged for all three
        status, _ = await post_chat(s, base, "same-id")
    assert status == 429


async def test_a_clients_plain_id_is_kept_for_correlation_and_never_used_as_the_key(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    seen: list[str] = []
    standin = StandIn(flavor="vllm", scale=0.0)
    app = standin.app()

    @aiohttp.web.middleware
    async def note_id(request: aiohttp.web.Request, handler: Any) -> aiohttp.web.StreamResponse:
        seen.append(request.headers.get("X-Request-Id", ""))
        return await handler(request)

    app.middlewares.append(note_id)
    up = await aiohttp_server(app)
    server, parts = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with aiohttp.ClientSession() as s:
        status, rid = await post_chat(s, url_of(server), "client-id-123")
        assert status == 200
        status, plain = await post_chat(s, url_of(server), None)
        assert status == 200
    await settle(parts)
    assert rid != "client-id-123" and len(rid) == 32
    assert seen == [rid, plain]  # the upstream gets the proxy's id
    rec = await parts.ledger.get(rid)
    assert rec is not None and rec.to_dict()["client_request_id"] == "client-id-123"
    rec = await parts.ledger.get(plain)
    assert rec is not None and "client_request_id" not in rec.to_dict()


# -- the same id at once ------------------------------------------------------------------------


async def two_at_once(base: str, gate: Gate, client_id: str) -> list[tuple[int, str]]:
    """Two requests with the same X-Request-Id, both held at the upstream until both arrived."""
    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(post_chat(s, base, client_id)) for _ in range(2)]
        async with asyncio.timeout(30):
            while gate.arrived < 2:
                await gate.changed.wait()
                gate.changed.clear()
            gate.open.set()
            return await asyncio.gather(*tasks)


@pytest.mark.parametrize("trust", [False, True])
async def test_the_same_id_sent_twice_at_once_makes_two_records(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, trust: bool
) -> None:
    gate = Gate()
    up = await aiohttp_server(gated_app(StandIn(flavor="vllm", scale=0.0), gate))
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        identity={"allow_header_identity": True, "trust_request_id": trust},
        admin_token_env=ADMIN_ENV,
    )
    server, parts = await make_proxy(cfg)  # metered: both requests fly in the engine at once
    answers = await two_at_once(url_of(server), gate, "dup")
    await settle(parts)

    assert [status for status, _ in answers] == [200, 200]
    ids = {rid for _, rid in answers}
    assert len(ids) == 2
    if trust:
        assert "dup" in ids  # the first keeps its id, the second gets a fresh one
    else:
        assert "dup" not in ids
    records = [await parts.ledger.get(rid) for rid in ids]
    assert all(rec is not None and rec.final for rec in records)
    assert {rec.request_id for rec in records if rec is not None} == ids
    for rec in records:
        assert rec is not None
        if rec.request_id != "dup":
            assert rec.extra["client_request_id"] == "dup"
        assert rec.energy_j > 0
    # records keep grams to 1e-9 g (to_dict rounds them); the day's totals are not rounded
    assert await used_today(parts.ledger, "carol") == (2, pytest.approx(sum_g(records), abs=1e-8))
    assert parts.accountant.requests == {}


async def test_a_trusted_id_is_held_while_its_body_is_still_coming(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The window before the accountant knows a request (body read, budget check): a second
    request with the same trusted id meanwhile gets a fresh one."""
    cfg = proxy_config(url_of(upstream), tmp_path, identity={"trust_request_id": True})
    server, parts = await make_proxy(cfg)
    forwarder = server.app[FORWARDER]
    rest = asyncio.Event()

    async def slow_body() -> Any:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "hi"}],'
        await rest.wait()
        yield b' "max_tokens": 4}'

    async with aiohttp.ClientSession() as s:

        async def first() -> tuple[int, str]:
            headers = {"X-Request-Id": "gw-9", "Content-Type": "application/json"}
            async with s.post(
                url_of(server) + "/v1/chat/completions", data=slow_body(), headers=headers
            ) as r:
                await r.read()
                return r.status, r.headers["X-Request-Id"]

        task = asyncio.create_task(first())
        async with asyncio.timeout(10):
            while not forwarder.in_flight("gw-9"):
                await asyncio.sleep(0.01)
        assert "gw-9" not in parts.accountant.requests  # still reading its body
        status, second = await post_chat(s, url_of(server), "gw-9")
        rest.set()
        assert await task == (200, "gw-9")
    assert status == 200 and second != "gw-9"
    await settle(parts)
    rec = await parts.ledger.get(second)
    assert rec is not None and rec.extra["client_request_id"] == "gw-9"


def sum_g(records: list[Any]) -> float:
    return float(sum(rec.co2e_g for rec in records))


# -- behind a gateway: trust_request_id ---------------------------------------------------------


async def test_a_trusted_id_is_the_records_key(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    cfg = proxy_config(url_of(upstream), tmp_path, identity={"trust_request_id": True})
    server, parts = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        status, rid = await post_chat(s, url_of(server), "gw-0001")
    await settle(parts)
    assert (status, rid) == (200, "gw-0001")
    rec = await parts.ledger.get("gw-0001")
    assert rec is not None and "client_request_id" not in rec.to_dict()


@pytest.mark.parametrize("trust", [False, True])
async def test_errors_the_proxy_answers_itself_follow_the_same_rule(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path, trust: bool
) -> None:
    cfg = proxy_config(
        url_of(upstream),
        tmp_path,
        identity={"trust_request_id": trust},
        limits={"max_body_bytes": 16},
    )
    server, _ = await make_proxy(cfg)
    headers = {"X-Request-Id": "err-1", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        # refused by the app's middleware (encoded slash), then by the handler (413)
        bad_target = URL(url_of(server) + "/v1%2Fchat/completions", encoded=True)
        async with s.post(bad_target, data=b"{}", headers=headers) as r:
            assert r.status == 400
            assert (r.headers["X-Request-Id"] == "err-1") is trust
        async with s.post(
            url_of(server) + "/v1/chat/completions", json=CHAT_16, headers=headers
        ) as r:
            assert r.status == 413
            assert (r.headers["X-Request-Id"] == "err-1") is trust


def test_trust_request_id_defaults_to_false(tmp_path: Path) -> None:
    assert proxy_config("http://127.0.0.1:9", tmp_path).identity.trust_request_id is False


class HeldMeter(SimulatedMeter):
    """The simulated meter behind a tap: with ``flowing`` clear, a read waits until it is set
    again, so no record can turn final meanwhile (records wait for a reading past their end)."""

    def __init__(self) -> None:
        super().__init__(noise=0.0)  # its load: its own tracker, told by the proxy
        self.flowing = threading.Event()
        self.flowing.set()
        self.waiting = threading.Event()

    def read(self) -> Reading:
        if not self.flowing.is_set():
            self.waiting.set()
            self.flowing.wait()
        return super().read()


async def test_a_trusted_id_still_being_accounted_for_is_not_reused(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    meter = HeldMeter()
    cfg = proxy_config(url_of(upstream), tmp_path, identity={"trust_request_id": True})
    server, parts = await make_proxy(cfg, meter=meter)
    meter.flowing.clear()
    try:
        async with asyncio.timeout(10):
            await asyncio.to_thread(meter.waiting.wait)  # no reading can be on its way now
        async with aiohttp.ClientSession() as s:
            first = await post_chat(s, url_of(server), "gw-7")
            assert first == (200, "gw-7")
            assert "gw-7" in parts.accountant.requests  # answered, its energy not yet known
            status, second = await post_chat(s, url_of(server), "gw-7")
        assert status == 200 and second != "gw-7"
    finally:
        meter.flowing.set()
    await settle(parts)
    rec = await parts.ledger.get(second)
    assert rec is not None and rec.extra["client_request_id"] == "gw-7"
    assert await parts.ledger.get("gw-7") is not None
