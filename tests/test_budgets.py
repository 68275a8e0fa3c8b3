"""Carbon budgets: the boundary, periods and Retry-After, scopes, caching, and the 429 the proxy
answers (body, header, metric)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestServer

from estimators.estimator import Estimator, RequestShape
from proxy.budgets import RESERVED_RETRY_S, Budgets, limits_of, period_of
from proxy.config import BudgetsConfig, Config
from proxy.errors import BudgetExceeded, LedgerError
from proxy.identity import Identity
from proxy.ledger.base import AggregateRow, Ledger
from proxy.ledger.redis import RedisLedger
from proxy.ledger.sqlite import SQLiteLedger
from proxy.records import RequestRecord, utc_iso
from proxy.standins import StandIn
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.budget_burst import (
    CHAT_16,
    G_PER_J,
    INTENSITY_G_PER_KWH,
    MAX_TOKENS,
    Gate,
    budget_config,
    burst,
    gated_app,
    request_g,
)
from tests.helpers.ledger_data import record
from tests.helpers.proxy_load import chat, settle
from tests.helpers.redis_server import (
    SHARED_PORT,
    delete_prefix,
    free_port,
    new_prefix,
    shared_redis_available,
    shared_redis_url,
)

NOON = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


class Counting(Ledger):
    """A ledger that counts reads and can be switched off."""

    backend = "counting"

    def __init__(self, inner: Ledger) -> None:
        self.inner = inner
        self.reads = 0
        self.down = False

    async def write(self, records: Sequence[RequestRecord]) -> int:
        return await self.inner.write(records)

    async def get(self, request_id: str) -> RequestRecord | None:
        return await self.inner.get(request_id)

    async def aggregates(
        self, start_day: str, end_day: str, user: str | None = None, team: str | None = None
    ) -> list[AggregateRow]:
        self.reads += 1
        if self.down:
            raise LedgerError("down")
        return await self.inner.aggregates(start_day, end_day, user, team)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Counting]:
    inner = SQLiteLedger(str(tmp_path / "ledger.db"))
    await inner.open()
    yield Counting(inner)
    await inner.close()


def budgets(ledger: Ledger, now: datetime = NOON, **cfg: Any) -> Budgets:
    cfg.setdefault("cache_s", 0)
    return Budgets(BudgetsConfig.model_validate(cfg), ledger, clock=lambda: now)


CAROL = Identity("carol", "research")


@pytest.mark.parametrize(
    ("used_g", "rejected"),
    [(0.75, False), (0.999999, False), (1.0, True), (1.000001, True), (3.0, True)],
)
async def test_a_budget_is_exhausted_when_used_reaches_it(
    ledger: Counting, used_g: float, rejected: bool
) -> None:
    await ledger.write([record("c1", user="carol", co2e_g=used_g / 2)])
    await ledger.write([record("c2", user="carol", co2e_g=used_g - used_g / 2)])
    b = budgets(ledger, users={"carol": {"grams_per_day": 1.0}})
    if not rejected:
        await b.check(CAROL)
        return
    with pytest.raises(BudgetExceeded) as info:
        await b.check(CAROL)
    err = info.value
    assert err.status == 429
    assert err.extra["budget_g"] == 1.0
    assert err.extra["used_g"] == pytest.approx(used_g)
    assert err.extra["scope"] == "user"
    assert err.extra["retry_after_s"] == 12 * 3600
    body = err.body()["error"]
    assert body["type"] == "carbon_budget_exceeded"
    assert "carol" in body["message"]


async def test_only_todays_grams_count_for_a_daily_budget(ledger: Counting) -> None:
    await ledger.write([record("y1", user="carol", day="2026-11-28", co2e_g=5.0)])
    await ledger.write([record("t1", user="carol", day="2026-11-29", co2e_g=0.5)])
    await budgets(ledger, users={"carol": {"grams_per_day": 1.0}}).check(CAROL)
    monthly = budgets(ledger, users={"carol": {"grams_per_month": 5.5}})
    with pytest.raises(BudgetExceeded) as info:
        await monthly.check(CAROL)
    assert info.value.extra["used_g"] == pytest.approx(5.5)
    assert info.value.extra["retry_after_s"] == 36 * 3600  # to 2026-12-01T00:00Z


@pytest.mark.parametrize(
    ("now", "kind", "start", "resets"),
    [
        ("2026-11-29T23:59:30+00:00", "day", "2026-11-29", "2026-11-30T00:00:00+00:00"),
        ("2026-12-31T23:00:00+00:00", "day", "2026-12-31", "2027-01-01T00:00:00+00:00"),
        ("2026-12-31T23:00:00+00:00", "month", "2026-12-01", "2027-01-01T00:00:00+00:00"),
        ("2028-02-29T10:00:00+00:00", "month", "2028-02-01", "2028-03-01T00:00:00+00:00"),
        ("2026-11-30T01:00:00+05:00", "day", "2026-11-29", "2026-11-30T00:00:00+00:00"),
    ],
)
def test_periods_are_utc_days_and_months(now: str, kind: str, start: str, resets: str) -> None:
    p = period_of(kind, datetime.fromisoformat(now))
    assert p.start_day.isoformat() == start
    assert p.resets_at == datetime.fromisoformat(resets)
    assert p.end_day == datetime.fromisoformat(now).astimezone(UTC).date()


async def test_retry_after_counts_the_seconds_to_the_next_utc_day(ledger: Counting) -> None:
    now = datetime(2026, 11, 29, 23, 59, 30, 200_000, tzinfo=UTC)
    await ledger.write([record("late", user="carol", co2e_g=2.0)])
    with pytest.raises(BudgetExceeded) as info:
        await budgets(ledger, now, users={"carol": {"grams_per_day": 1.0}}).check(CAROL)
    assert info.value.extra["retry_after_s"] == 30  # 29.8 s, rounded up


def test_which_budgets_apply() -> None:
    cfg = BudgetsConfig.model_validate(
        {
            "users": {"carol": {"grams_per_day": 5, "grams_per_month": 50}},
            "teams": {"research": {"grams_per_month": 100}},
            "default": {"grams_per_day": 1},
        }
    )
    assert [(x.scope, x.key, x.period, x.budget_g) for x in limits_of(cfg, CAROL)] == [
        ("user", "carol", "day", 5.0),
        ("user", "carol", "month", 50.0),
        ("team", "research", "month", 100.0),
    ]
    dave = limits_of(cfg, Identity("dave"))
    assert [(x.scope, x.key, x.budget_g) for x in dave] == [("user", "dave", 1.0)]
    assert limits_of(BudgetsConfig(), Identity("dave")) == []


async def test_a_team_budget_counts_every_member(ledger: Counting) -> None:
    await ledger.write([record("a1", user="alice", team="research", co2e_g=0.6)])
    await ledger.write([record("c1", user="carol", team="research", co2e_g=0.4)])
    await ledger.write([record("o1", user="olga", team="other", co2e_g=9.0)])
    b = budgets(ledger, teams={"research": {"grams_per_day": 1.0}})
    with pytest.raises(BudgetExceeded) as info:
        await b.check(CAROL)
    assert info.value.extra["scope"] == "team"
    assert info.value.extra["used_g"] == pytest.approx(1.0)
    await b.check(Identity("carol", None))
    await b.check(Identity("olga", "other"))


async def test_the_default_budget_is_per_user(ledger: Counting) -> None:
    await ledger.write([record("d1", user="dave", co2e_g=1.0)])
    b = budgets(ledger, default={"grams_per_day": 1.0}, users={"dave": {"grams_per_day": 2.0}})
    await b.check(Identity("dave"))  # his own budget replaces the default
    await b.check(Identity("erin"))
    await ledger.write([record("e1", user="erin", co2e_g=1.0)])
    with pytest.raises(BudgetExceeded):
        await b.check(Identity("erin"))


async def test_reads_are_cached_and_local_records_added(ledger: Counting) -> None:
    await ledger.write([record("k1", user="carol", co2e_g=0.5)])
    b = budgets(ledger, cache_s=60, users={"carol": {"grams_per_day": 1.0}})
    for _ in range(20):
        await b.check(CAROL)
    assert ledger.reads == 1
    b.observe(record("k2", user="carol", co2e_g=0.3))
    b.observe(record("x1", user="dave", co2e_g=5.0))
    b.observe(record("old", user="carol", day="2026-11-28", co2e_g=5.0))
    await b.check(CAROL)
    assert await b.used_g("user", "carol", "day") == pytest.approx(0.8)
    b.observe(record("k3", user="carol", co2e_g=0.2))
    with pytest.raises(BudgetExceeded):
        await b.check(CAROL)
    assert ledger.reads == 1


async def test_a_refresh_replaces_local_grams_with_the_ledgers(ledger: Counting) -> None:
    clock = [NOON]
    b = Budgets(
        BudgetsConfig.model_validate({"cache_s": 10, "users": {"carol": {"grams_per_day": 1}}}),
        ledger,
        clock=lambda: clock[0],
    )
    await b.check(CAROL)
    rec = record("k1", user="carol", co2e_g=0.4)
    b.observe(rec)
    await ledger.write([rec])
    b.written([rec])  # the ledger writer says so
    clock[0] = NOON + timedelta(seconds=11)
    assert await b.used_g("user", "carol", "day") == pytest.approx(0.4)  # not 0.8
    assert ledger.reads == 2


async def test_a_refresh_keeps_final_records_the_ledger_has_not_stored_yet(
    ledger: Counting,
) -> None:
    """The writer stores records in batches: one final here but not written yet is in neither
    the ledger's figure nor (if a refresh dropped it) the local one."""
    clock = [NOON]
    b = Budgets(
        BudgetsConfig.model_validate({"cache_s": 10, "users": {"carol": {"grams_per_day": 1}}}),
        ledger,
        clock=lambda: clock[0],
    )
    await b.check(CAROL)
    early, late = record("k1", user="carol", co2e_g=0.4), record("k2", user="carol", co2e_g=0.3)
    b.observe(early)
    b.observe(late)
    await ledger.write([early])
    b.written([early])
    clock[0] = NOON + timedelta(seconds=11)
    assert await b.used_g("user", "carol", "day") == pytest.approx(0.7)
    await ledger.write([late])
    b.written([late])
    clock[0] = NOON + timedelta(seconds=22)
    assert await b.used_g("user", "carol", "day") == pytest.approx(0.7)


async def test_budgets_fail_open_when_the_ledger_is_down(ledger: Counting) -> None:
    ledger.down = True
    b = budgets(ledger, users={"carol": {"grams_per_day": 1.0}})
    await b.check(CAROL)
    b.observe(record("k1", user="carol", co2e_g=1.5))
    with pytest.raises(BudgetExceeded):  # what this process saw still counts
        await b.check(CAROL)


# -- through the proxy ---------------------------------------------------------------------------


async def test_the_proxy_answers_429_with_retry_after_and_counts_it(
    make_proxy: ProxyFactory, upstream: TestServer, tmp_path: Path
) -> None:
    cfg = proxy_config(
        url_of(upstream),
        tmp_path,
        identity={"allow_header_identity": True},
        budgets={"users": {"carol": {"grams_per_day": 1.0}}, "cache_s": 0},
    )
    server, parts = await make_proxy(cfg)
    base = url_of(server)
    now = utc_iso(datetime.now(UTC))
    today = now[:10]

    def charged(rid: str, co2e_g: float) -> RequestRecord:
        r = record(rid, user="carol", day=today, co2e_g=co2e_g)
        r.ended_at = now
        return r

    async with aiohttp.ClientSession() as session:
        await parts.ledger.write([charged("pre-1", 0.5), charged("pre-2", 0.25)])
        status, _, _ = await chat(session, base, user="carol")
        assert status == 200  # 0.75 g of 1 g: under budget
        await settle(parts)
        used = sum(r.co2e_g for r in await parts.ledger.aggregates(today, today, user="carol"))
        await parts.ledger.write([charged("pre-3", 1.0 - used + 1e-9)])  # just over

        async with session.post(
            f"{base}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Wattproxy-User": "carol"},
        ) as r:
            assert r.status == 429
            body = json.loads(await r.read())
            retry_after = int(r.headers["Retry-After"])
            assert r.headers["X-Request-Id"]
        status, _, _ = await chat(session, base, user="dave")
        assert status == 200

    assert set(body) == {"error"}
    err = body["error"]
    assert err["type"] == "carbon_budget_exceeded"
    assert err["budget_g"] == 1.0
    assert err["used_g"] == pytest.approx(1.0, abs=1e-6)
    assert "carol" in err["message"]
    assert "retry_after_s" not in err
    midnight = datetime.combine(
        datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC
    )
    assert 0 < retry_after <= (midnight - datetime.now(UTC)).total_seconds() + 2
    reg = parts.metrics.registry
    assert reg.get_sample_value("wattproxy_budget_rejections_total", {"scope": "user"}) == 1
    assert reg.get_sample_value("wattproxy_budget_rejections_total", {"scope": "team"}) is None


async def test_without_budgets_the_proxy_checks_nothing(
    make_proxy: ProxyFactory, upstream: TestServer, tmp_path: Path
) -> None:
    cfg = proxy_config(url_of(upstream), tmp_path, identity={"allow_header_identity": True})
    server, parts = await make_proxy(cfg)
    assert parts.budgets is not None
    assert parts.budgets.enabled is False
    assert parts.runtime.budget_check is None  # no work on the request path
    await parts.ledger.write([record("big", user="carol", co2e_g=1e6)])
    async with aiohttp.ClientSession() as session:
        status, _, _ = await chat(session, url_of(server), user="carol")
    assert status == 200
    await settle(parts)
    assert parts.budgets.holds.added == 0


# -- concurrent admission: reservations --------------------------------------------------------

E_G = request_g()  # grams of one burst request


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    if not shared_redis_available():
        pytest.skip("no Redis on 127.0.0.1:6379 (make test starts one: scripts/ensure-redis.sh)")
    prefix = new_prefix()
    yield prefix
    delete_prefix(prefix)


@pytest.fixture
async def gated(aiohttp_server: Any, standin: StandIn) -> tuple[TestServer, Gate]:
    gate = Gate()
    server: TestServer = await aiohttp_server(gated_app(standin, gate))
    return server, gate


def ledger_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    if backend == "sqlite":
        return None
    return shared_redis_url(request.getfixturevalue("redis_prefix"))


def today() -> str:
    return datetime.now(UTC).date().isoformat()


async def used_today(ledger: Ledger, user: str) -> float:
    day = today()
    return sum(r.co2e_g for r in await ledger.aggregates(day, day, user=user))


def redis_holds(prefix: str) -> list[str]:
    """The reservation keys left under a key prefix on the shared Redis."""
    client = redis.Redis(host="127.0.0.1", port=SHARED_PORT, decode_responses=True)
    try:
        return sorted(k for k in client.scan_iter(match=f"{prefix}:*") if ":held" in k)
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
@pytest.mark.parametrize("budget_requests", [0.02, 2.5])
async def test_a_burst_cannot_overshoot_a_budget_by_more_than_one_request(
    make_proxy: ProxyFactory,
    gated: tuple[TestServer, Gate],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
    budget_requests: float,
) -> None:
    upstream, gate = gated
    budget_g = budget_requests * E_G  # 0.02 requests: about the 0.0005 g/day of the issue
    cfg = budget_config(url_of(upstream), tmp_path, budget_g, ledger_url(backend, request))
    server, parts = await make_proxy(cfg)
    assert parts.carbon is not None and parts.carbon.g_per_j() == pytest.approx(G_PER_J)
    assert parts.budgets is not None

    statuses = await burst([url_of(server)], 50, gate)
    await settle(parts)

    admitted = statuses.count(200)
    assert admitted + statuses.count(429) == 50
    assert admitted >= 1
    assert admitted == gate.arrived
    admitted_g = await used_today(parts.ledger, "carol")
    assert admitted_g == pytest.approx(admitted * E_G)
    assert admitted_g <= budget_g + E_G * (1 + 1e-9)
    assert parts.budgets.reserved_g("user", "carol") == 0.0


async def test_reservations_are_held_while_requests_are_in_flight(
    make_proxy: ProxyFactory, gated: tuple[TestServer, Gate], tmp_path: Path
) -> None:
    upstream, gate = gated
    server, parts = await make_proxy(budget_config(url_of(upstream), tmp_path, 9.5 * E_G))
    assert parts.budgets is not None
    budgets_ = parts.budgets
    seen: list[float] = []

    async def before_open() -> None:
        seen.append(budgets_.reserved_g("user", "carol"))

    statuses = await burst([url_of(server)], 12, gate, before_open=before_open)
    assert statuses.count(200) == 10  # 9 reserved < 9.5 admits the tenth
    assert seen == [pytest.approx(10 * E_G)]


async def test_a_reservation_is_priced_at_its_upstreams_own_grid(
    make_proxy: ProxyFactory, gated: tuple[TestServer, Gate], tmp_path: Path
) -> None:
    """An upstream with its own grid (``upstreams[].carbon``, a tenth of the section's
    intensity) is charged a tenth of the grams: its requests reserve a tenth too, so ten fit
    in a budget of 0.95 section-priced requests (at the section's price only one would)."""
    upstream, gate = gated
    doc = budget_config(url_of(upstream), tmp_path, 0.95 * E_G).model_dump()
    doc["upstreams"][0]["carbon"] = {"intensity_g_per_kwh": INTENSITY_G_PER_KWH / 10}
    cfg = Config.model_validate(doc)
    server, parts = await make_proxy(cfg)
    assert parts.budgets is not None
    budgets_ = parts.budgets
    seen: list[float] = []

    async def before_open() -> None:
        seen.append(budgets_.reserved_g("user", "carol"))

    statuses = await burst([url_of(server)], 12, gate, before_open=before_open)
    assert statuses.count(200) == 10  # 9 reserved at a tenth < 0.95 admits the tenth
    assert seen == [pytest.approx(E_G)]
    await settle(parts)
    assert await used_today(parts.ledger, "carol") == pytest.approx(E_G)  # what was charged


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_every_reservation_is_released_failures_before_the_upstream_too(
    make_proxy: ProxyFactory,
    upstream: TestServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: 502
    cfg = budget_config(
        url_of(upstream),
        tmp_path,
        1000 * E_G,
        ledger_url(backend, request),
        extra_upstreams=[{"name": "dead", "url": dead, "devices": [], "models": ["dead"]}],
        limits={"max_body_bytes": 4096},
    )
    server, parts = await make_proxy(cfg)
    assert parts.budgets is not None
    base = url_of(server)

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"\0" * 4096

    statuses = []
    async with aiohttp.ClientSession() as session:
        for body in ({**CHAT_16}, {**CHAT_16, "model": "dead"}) * 3:
            async with session.post(
                f"{base}/v1/chat/completions", json=body, headers={"X-Wattproxy-User": "carol"}
            ) as r:
                statuses.append(r.status)
        for _ in range(2):  # streamed upload over the limit: cut short on its way upstream
            async with session.post(
                f"{base}/v1/audio/transcriptions",
                data=upload(),
                headers={"X-Wattproxy-User": "carol", "Content-Type": "audio/wav"},
            ) as r:
                statuses.append(r.status)
    await settle(parts)

    assert statuses == [200, 502] * 3 + [413, 413]
    book = parts.budgets.holds
    assert (book.added, book.released) == (8, 8)
    assert parts.budgets.reserved_g("user", "carol") == 0.0
    assert await used_today(parts.ledger, "carol") == pytest.approx(3 * E_G)
    if backend == "redis":
        assert redis_holds(request.getfixturevalue("redis_prefix")) == []


def reserving(ledger: Ledger, now: datetime = NOON, **cfg: Any) -> Budgets:
    cfg.setdefault("cache_s", 0)
    return Budgets(
        BudgetsConfig.model_validate(cfg),
        ledger,
        clock=lambda: now,
        estimator=Estimator(),
        g_per_j=lambda upstream: G_PER_J,
    )


SHAPE = RequestShape("llm", "m", "text-generation", completion_tokens=MAX_TOKENS)


async def test_admission_counts_reservations_and_refused_requests_reserve_nothing(
    ledger: Counting,
) -> None:
    b = reserving(ledger, users={"carol": {"grams_per_day": 1.5 * E_G}})
    await b.check(CAROL, "r1", SHAPE)
    await b.check(CAROL, "r2", SHAPE)  # 1 reserved < 1.5
    assert b.reserved_g("user", "carol") == pytest.approx(2 * E_G)
    with pytest.raises(BudgetExceeded) as info:
        await b.check(CAROL, "r3", SHAPE)
    err = info.value
    assert err.extra["used_g"] == pytest.approx(2 * E_G, abs=1e-6)
    assert "reserved" in err.message
    assert err.extra["retry_after_s"] <= RESERVED_RETRY_S  # not exhausted: in-flight requests
    assert b.holds.added == 2
    assert b.reserved_g("user", "carol") == pytest.approx(2 * E_G)

    final = record("r1", user="carol", team=None, day="2026-11-29", co2e_g=0.25 * E_G)
    b.observe(final)  # its real grams replace its estimate
    assert b.reserved_g("user", "carol") == pytest.approx(E_G)
    await b.check(CAROL, "r4", SHAPE)  # 0.25 used + 1 reserved < 1.5
    b.observe(final)  # a record is released once
    assert b.reserved_g("user", "carol") == pytest.approx(2 * E_G)


async def test_a_team_refusal_releases_what_the_user_reserved(ledger: Counting) -> None:
    b = reserving(
        ledger,
        users={"carol": {"grams_per_day": 10 * E_G}},
        teams={"research": {"grams_per_month": 0.5 * E_G}},
    )
    await b.check(CAROL, "r1", SHAPE)
    with pytest.raises(BudgetExceeded) as info:
        await b.check(CAROL, "r2", SHAPE)
    assert info.value.extra["scope"] == "team"
    assert b.reserved_g("user", "carol") == pytest.approx(E_G)
    assert b.reserved_g("team", "research") == pytest.approx(E_G)


async def test_reservations_expire_after_their_ttl(ledger: Counting) -> None:
    clock = [NOON]
    b = Budgets(
        BudgetsConfig.model_validate(
            {"cache_s": 0, "reservation_ttl_s": 60, "users": {"carol": {"grams_per_day": E_G}}}
        ),
        ledger,
        clock=lambda: clock[0],
        estimator=Estimator(),
        g_per_j=lambda upstream: G_PER_J,
    )
    await b.check(CAROL, "lost", SHAPE)  # never finalized: its process crashed, say
    with pytest.raises(BudgetExceeded):
        await b.check(CAROL, "r2", SHAPE)
    clock[0] = NOON + timedelta(seconds=61)
    await b.check(CAROL, "r3", SHAPE)
    assert b.reserved_g("user", "carol") == pytest.approx(E_G)


async def test_without_a_request_shape_nothing_is_reserved(ledger: Counting) -> None:
    b = reserving(ledger, users={"carol": {"grams_per_day": E_G}})
    await b.check(CAROL)
    await b.check(Identity("dave"), "d1", SHAPE)  # no budget applies to dave
    assert b.holds.added == 0


# -- the same on Redis, across processes -----------------------------------------------------------


@pytest.fixture
async def redis_ledger(redis_prefix: str) -> AsyncIterator[RedisLedger]:
    led = RedisLedger.from_url(shared_redis_url(redis_prefix))
    await led.open()
    yield led
    await led.close()


def on_redis(ledger: Ledger, ttl_s: float = 600.0, **cfg: Any) -> Budgets:
    return Budgets(
        BudgetsConfig.model_validate({"cache_s": 0, "reservation_ttl_s": ttl_s, **cfg}),
        ledger,
        estimator=Estimator(),
        g_per_j=lambda upstream: G_PER_J,
    )


async def test_redis_reservations_are_atomic_across_processes(redis_prefix: str) -> None:
    url = shared_redis_url(redis_prefix)
    ledgers = [RedisLedger.from_url(url) for _ in range(4)]
    for led in ledgers:
        await led.open()
    try:
        replicas = [on_redis(led, users={"carol": {"grams_per_day": 2.5 * E_G}}) for led in ledgers]
        results = await asyncio.gather(
            *(replicas[i % 4].check(CAROL, f"r{i}", SHAPE) for i in range(40)),
            return_exceptions=True,
        )
        assert sum(r is None for r in results) == 3
        assert all(isinstance(r, BudgetExceeded) for r in results if r is not None)
        assert len(redis_holds(redis_prefix)) == 2  # the user's hold hash and its expiries
        # the records are final, then reach the ledger: every hold is released, the grams count
        admitted = [i for i, r in enumerate(results) if r is None]
        records = {
            i: record(f"r{i}", user="carol", team=None, day=today(), co2e_g=E_G) for i in admitted
        }
        for i, rec in records.items():
            replicas[i % 4].observe(rec)
        await ledgers[0].write(list(records.values()))
        for i, rec in records.items():
            replicas[i % 4].written([rec])
        assert redis_holds(redis_prefix) == []
        with pytest.raises(BudgetExceeded) as info:
            await replicas[1].check(CAROL, "late", SHAPE)
        assert info.value.extra["used_g"] == pytest.approx(3 * E_G, abs=1e-6)
        assert "reserved" not in info.value.message
    finally:
        for led in ledgers:
            await led.close()


async def test_a_crashed_replicas_redis_reservation_expires(
    redis_ledger: RedisLedger, redis_prefix: str
) -> None:
    budget = {"carol": {"grams_per_day": 1.5 * E_G}}
    crashed = on_redis(redis_ledger, ttl_s=0.05, users=budget)
    await crashed.check(CAROL, "lost", SHAPE)  # reserved, never released
    other = on_redis(redis_ledger, users=budget)
    await other.check(CAROL, "keep", SHAPE)  # 1 held < 1.5
    with pytest.raises(BudgetExceeded):
        await other.check(CAROL, "r2", SHAPE)
    await asyncio.sleep(0.1)  # past the lost hold's expiry, not the other's
    await other.check(CAROL, "r3", SHAPE)
    client = redis.Redis(host="127.0.0.1", port=SHARED_PORT, decode_responses=True)
    try:
        held = [k for k in redis_holds(redis_prefix) if k.endswith(":held")]
        assert len(held) == 1
        assert client.hget(held[0], "lost") is None
        assert client.hget(held[0], "keep") is not None
        assert 0 < client.pttl(held[0]) <= 600_000  # and the keys themselves expire
    finally:
        client.close()


async def test_a_team_refusal_on_redis_releases_the_users_hold(
    redis_ledger: RedisLedger, redis_prefix: str
) -> None:
    b = on_redis(
        redis_ledger,
        users={"carol": {"grams_per_day": 10 * E_G}},
        teams={"research": {"grams_per_month": 0.5 * E_G}},
    )
    await b.check(CAROL, "r1", SHAPE)
    other = on_redis(
        redis_ledger,
        users={"carol": {"grams_per_day": 10 * E_G}},
        teams={"research": {"grams_per_month": 0.5 * E_G}},
    )
    with pytest.raises(BudgetExceeded) as info:  # another replica: only Redis knows of r1
        await other.check(Identity("carol", "research"), "r2", SHAPE)
    assert info.value.extra["scope"] == "team"
    client = redis.Redis(host="127.0.0.1", port=SHARED_PORT, decode_responses=True)
    try:
        holds = {k: client.hkeys(k) for k in redis_holds(redis_prefix) if k.endswith(":held")}
    finally:
        client.close()
    # r2's user hold was released: only r1 is held, by carol and by her team
    held = sorted(sorted(f for f in fields if not f.startswith("=")) for fields in holds.values())
    assert held == [["r1"], ["r1"]]


class SlowReply(RedisLedger):
    """Redis runs the reservation, then the reply is late: the caller may be cancelled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reserved = asyncio.Event()
        self.reply = asyncio.Event()

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().reserve(*args, **kwargs)
        self.reserved.set()
        await self.reply.wait()
        return result


async def test_a_check_cancelled_after_redis_reserved_releases_it(redis_prefix: str) -> None:
    led = SlowReply.from_url(shared_redis_url(redis_prefix))
    await led.open()
    try:
        b = on_redis(led, users={"carol": {"grams_per_day": 10 * E_G}})
        task = asyncio.create_task(b.check(CAROL, "gone", SHAPE))
        await led.reserved.wait()
        assert redis_holds(redis_prefix) != []
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await b.drain()
        assert redis_holds(redis_prefix) == []
        assert b.reserved_g("user", "carol") == 0.0
    finally:
        await led.close()
