"""Carbon budgets: grams CO2e per UTC day or month, per user, per team, or a default per user.

A budget is exhausted when the grams used in its period reach it (``used_g >= budget_g``); the
next request of that user or team is then answered 429 until the period ends. Used grams come
from the shared ledger, so every replica sees what the others charged. A ledger read is cached
for ``budgets.cache_s`` per (scope, key, period), and the records this process finalizes in the
meantime are added to the cached figure (``observe``), so a check costs no round trip per
request. When the ledger cannot be read the last figure is kept (plus local records): budgets
fail open rather than stop serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from proxy.config import Budget, BudgetsConfig
from proxy.errors import BudgetExceeded, LedgerError
from proxy.identity import Identity
from proxy.ledger.base import Ledger
from proxy.records import RequestRecord, utcnow

log = logging.getLogger("wattproxy.budgets")

READ_TIMEOUT_S = 0.5  # one ledger read on the request path, at most
FAILED_RETRY_S = 1.0  # after a failed read, wait at least this long before the next one


@dataclass(frozen=True, slots=True)
class Limit:
    """One budget that applies to a caller."""

    scope: str  # "user" or "team"
    key: str
    period: str  # "day" or "month"
    budget_g: float


@dataclass(frozen=True, slots=True)
class Period:
    start_day: date
    end_day: date
    resets_at: datetime


def period_of(kind: str, now: datetime) -> Period:
    """The UTC day or month containing ``now``, and when the next one starts."""
    today = now.astimezone(UTC).date()
    if kind == "day":
        start = today
        nxt = today + timedelta(days=1)
    else:
        start = today.replace(day=1)
        nxt = (start + timedelta(days=32)).replace(day=1)
    return Period(start, today, datetime(nxt.year, nxt.month, nxt.day, tzinfo=UTC))


def limits_of(cfg: BudgetsConfig, identity: Identity) -> list[Limit]:
    """The budgets that apply: the user's own (else the default), and the team's."""
    found: list[Limit] = []

    def add(scope: str, key: str, budget: Budget | None) -> None:
        if budget is None:
            return
        if budget.grams_per_day is not None:
            found.append(Limit(scope, key, "day", budget.grams_per_day))
        if budget.grams_per_month is not None:
            found.append(Limit(scope, key, "month", budget.grams_per_month))

    add("user", identity.user, cfg.users.get(identity.user, cfg.default))
    if identity.team:
        add("team", identity.team, cfg.teams.get(identity.team))
    return found


CacheKey = tuple[str, str, str, str]  # scope, key, start day, end day


@dataclass(slots=True)
class _Used:
    """Grams used in one period: the ledger's figure plus what this process added since."""

    start_day: str
    end_day: str
    ledger_g: float = 0.0
    local_g: float = 0.0
    checked_at: datetime | None = None
    failed: bool = False

    @property
    def used_g(self) -> float:
        return self.ledger_g + self.local_g


class Budgets:
    """Checks callers against their carbon budgets.

    Args:
        cfg: the ``budgets`` section.
        ledger: the shared ledger (its ``used_g`` is read).
        clock: the current time, timezone-aware UTC.
        read_timeout_s: seconds a ledger read may take on the request path.
    """

    def __init__(
        self,
        cfg: BudgetsConfig,
        ledger: Ledger,
        clock: Callable[[], datetime] = utcnow,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.clock = clock
        self.read_timeout_s = read_timeout_s
        self._cache: dict[CacheKey, _Used] = {}
        self._refreshing: dict[CacheKey, asyncio.Task[float]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.users or self.cfg.teams or self.cfg.default)

    async def check(self, identity: Identity) -> None:
        """Raise ``BudgetExceeded`` when one of the caller's budgets is exhausted; when several
        are, the one that resets last is reported (the caller must wait for it)."""
        limits = limits_of(self.cfg, identity)
        if not limits:
            return
        now = self.clock()
        periods = [period_of(limit.period, now) for limit in limits]
        # one to three limits, nearly always cached: awaited in turn, no task per request
        used = [
            await self._used(lim.scope, lim.key, p, now)
            for lim, p in zip(limits, periods, strict=True)
        ]
        worst: tuple[Limit, float, int] | None = None
        for limit, period, used_g in zip(limits, periods, used, strict=True):
            if used_g < limit.budget_g:
                continue
            retry_after_s = max(1, math.ceil((period.resets_at - now).total_seconds()))
            if worst is None or retry_after_s > worst[2]:
                worst = (limit, used_g, retry_after_s)
        if worst is None:
            return
        limit, used_g, retry_after_s = worst
        when = "today (UTC)" if limit.period == "day" else "this month (UTC)"
        raise BudgetExceeded(
            f"carbon budget of {limit.scope} {limit.key!r} is exhausted: {used_g:.3f} g CO2e "
            f"used {when} of {limit.budget_g:g} g; it resets in {retry_after_s} s",
            budget_g=limit.budget_g,
            used_g=round(used_g, 6),
            scope=limit.scope,
            period=limit.period,
            retry_after_s=retry_after_s,
        )

    def observe(self, record: RequestRecord) -> None:
        """A final record of this process: add its grams to the cached figures it belongs to."""
        if not record.co2e_g or not self._cache:
            return
        day = record.day
        for (scope, key, _, _), entry in self._cache.items():
            mine = (scope == "user" and key == record.user) or (
                scope == "team" and key == record.team
            )
            if mine and entry.start_day <= day <= entry.end_day:
                entry.local_g += record.co2e_g

    async def used_g(self, scope: str, key: str, period: str) -> float:
        """Grams used by a user or team in the current day or month, as the check sees them."""
        now = self.clock()
        return await self._used(scope, key, period_of(period, now), now)

    async def _used(self, scope: str, key: str, period: Period, now: datetime) -> float:
        ck = (scope, key, period.start_day.isoformat(), period.end_day.isoformat())
        entry = self._cache.get(ck)
        if entry is None:
            entry = self._cache[ck] = _Used(ck[2], ck[3])
            self._prune(ck[3])
        elif entry.checked_at is not None:
            fresh_s = max(self.cfg.cache_s, FAILED_RETRY_S if entry.failed else 0.0)
            if (now - entry.checked_at).total_seconds() < fresh_s:
                return entry.used_g
        task = self._refreshing.get(ck)
        if task is None:
            task = asyncio.ensure_future(self._refresh(ck, entry, now))
            self._refreshing[ck] = task
            task.add_done_callback(lambda _: self._refreshing.pop(ck, None))
        return await asyncio.shield(task)

    async def _refresh(self, ck: CacheKey, entry: _Used, now: datetime) -> float:
        scope, key, start_day, end_day = ck
        local_before_g = entry.local_g
        entry.checked_at = now
        try:
            async with asyncio.timeout(self.read_timeout_s):
                ledger_g = await self.ledger.used_g(scope, key, start_day, end_day)
        except (LedgerError, TimeoutError) as e:
            if not entry.failed:
                log.warning(
                    "cannot read used grams of %s %r (budgets keep the last figure): %s",
                    scope,
                    key,
                    e or f"no answer within {self.read_timeout_s} s",
                )
            entry.failed = True
            return entry.used_g
        entry.failed = False
        entry.ledger_g = ledger_g
        # records observed while the read was in flight are not in the ledger's figure
        entry.local_g -= local_before_g
        return entry.used_g

    def _prune(self, today: str) -> None:
        """Forget periods that are over."""
        for ck in [ck for ck, e in self._cache.items() if e.end_day < today]:
            del self._cache[ck]
