"""Carbon budgets: the boundary, periods and Retry-After, scopes, caching, and the 429 the proxy
answers (body, header, metric)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.budgets import Budgets, limits_of, period_of
from proxy.config import BudgetsConfig
from proxy.errors import BudgetExceeded, LedgerError
from proxy.identity import Identity
from proxy.ledger.base import AggregateRow, Ledger
from proxy.ledger.sqlite import SQLiteLedger
from proxy.records import RequestRecord, utc_iso
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.ledger_data import record
from tests.helpers.proxy_load import chat, settle

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
    clock[0] = NOON + timedelta(seconds=11)
    assert await b.used_g("user", "carol", "day") == pytest.approx(0.4)  # not 0.8
    assert ledger.reads == 2


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
    await parts.ledger.write([record("big", user="carol", co2e_g=1e6)])
    async with aiohttp.ClientSession() as session:
        status, _, _ = await chat(session, url_of(server), user="carol")
    assert status == 200
