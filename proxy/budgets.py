"""Carbon budgets: grams CO2e per UTC day or month, per user, per team, or a default per user.

A request is admitted while, for every budget that applies, the grams used plus the grams
reserved by requests in flight are under the budget (``used_g + reserved_g < budget_g``). It then
reserves its expected grams (the estimate of its plan, times the grid's grams per joule now)
until its record is final, when its real grams count as used instead: a burst of concurrent
requests cannot overshoot a budget by more than one request's estimate. Refused requests
reserve nothing.

Used grams come from the shared ledger, read through a cache of ``budgets.cache_s`` per (scope,
key, period); the records this process finalizes meanwhile are added to the cached figure
(``observe``) until the ledger's figure holds them (``written``), so a check costs no ledger
read per request. When the ledger cannot be read the last figure is kept (plus local records):
budgets fail open rather than stop serving.

Where reservations live: every process keeps its own (``Holds``), released when a request's
record is final. That is all with SQLite (one SQLite file serves one process). A ledger with
``shared_reservations`` (Redis) also checks and reserves atomically, one script per user and per
team, so replicas cannot admit past a budget together; there a hold is released by the script
that writes the request's record, which adds its grams in the same step. Holds expire after
``budgets.reservation_ttl_s`` (a replica that died leaves none for longer).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from estimators.estimator import Estimator, RequestShape
from proxy.config import Budget, BudgetsConfig
from proxy.errors import BudgetExceeded, LedgerError
from proxy.identity import Identity
from proxy.ledger.base import Ledger, PeriodLimit
from proxy.records import RequestRecord, utcnow

log = logging.getLogger("wattproxy.budgets")

FAILED_RETRY_S = 1.0  # after a failed read, wait at least this long before the next one
#: Retry-After (s) when only requests in flight fill a budget: they may end under their estimate.
RESERVED_RETRY_S = 5


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
Owner = tuple[str, str]  # scope, key


@dataclass(slots=True)
class _Used:
    """Grams used in one period: the ledger's figure plus what this process added since."""

    start_day: str
    end_day: str
    ledger_g: float = 0.0
    #: final records of this process since the read (not all of them in the ledger yet)
    local_g: float = 0.0
    #: the part of ``local_g`` the ledger has stored since (the next read holds it)
    written_g: float = 0.0
    checked_at: datetime | None = None
    failed: bool = False

    @property
    def used_g(self) -> float:
        return self.ledger_g + self.local_g


@dataclass(slots=True)
class Hold:
    """The grams one admitted request reserved, for each user or team whose budget applies."""

    request_id: str
    grams: float
    owners: tuple[Owner, ...]
    expires_at: datetime


class Holds:
    """This process's reservations: per user and team, the grams of admitted requests whose
    records are not final yet. A request id sent twice at once holds twice."""

    def __init__(self) -> None:
        self._by_request: dict[str, list[Hold]] = {}  # oldest first
        self._g: dict[Owner, float] = {}
        self._n: dict[Owner, int] = {}
        self.added = 0
        self.released = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._by_request)

    def reserved_g(self, owner: Owner) -> float:
        return self._g.get(owner, 0.0)

    def add(self, hold: Hold) -> None:
        self._by_request.setdefault(hold.request_id, []).append(hold)
        for owner in hold.owners:
            self._g[owner] = self._g.get(owner, 0.0) + hold.grams
            self._n[owner] = self._n.get(owner, 0) + 1
        self.added += 1

    def release(self, request_id: str) -> Hold | None:
        """Drop the (oldest) hold of a request; None when it holds nothing."""
        held = self._by_request.get(request_id)
        if not held:
            return None
        hold = held.pop(0)
        if not held:
            del self._by_request[request_id]
        self._drop(hold)
        self.released += 1
        return hold

    def expire(self, now: datetime) -> None:
        """Drop holds past their expiry, oldest first (one TTL for all: insertion order)."""
        while self._by_request:
            request_id, held = next(iter(self._by_request.items()))
            if held[0].expires_at > now:
                return
            self._drop(held.pop(0))
            if not held:
                del self._by_request[request_id]
            self.expired += 1

    def _drop(self, hold: Hold) -> None:
        for owner in hold.owners:
            n = self._n[owner] - 1
            if n:
                self._n[owner] = n
                self._g[owner] -= hold.grams
            else:  # the last one: no rounding residue left behind
                del self._n[owner], self._g[owner]


class Budgets:
    """Checks callers against their carbon budgets and reserves what admitted requests expect.

    Args:
        cfg: the ``budgets`` section.
        ledger: the shared ledger (its ``used_g`` is read; ``reserve`` where it shares them).
        clock: the current time, timezone-aware UTC.
        read_timeout_s: seconds a ledger read or reservation may take on the request path
            (default: ``budgets.ledger_timeout_s``).
        estimator: expected joules of a request's plan (none: requests reserve 0 g).
        g_per_j: grams CO2e per joule now where an upstream (named) draws its power: its own
            grid when it has one (``upstreams[].carbon``), else the ``carbon:`` section's.
    """

    def __init__(
        self,
        cfg: BudgetsConfig,
        ledger: Ledger,
        clock: Callable[[], datetime] = utcnow,
        read_timeout_s: float | None = None,
        estimator: Estimator | None = None,
        g_per_j: Callable[[str], float] = lambda upstream: 0.0,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.clock = clock
        self._read_timeout_s = read_timeout_s
        self.estimator = estimator
        self.g_per_j = g_per_j
        self.holds = Holds()
        self._cache: dict[CacheKey, _Used] = {}
        self._refreshing: dict[CacheKey, asyncio.Task[float]] = {}
        #: request id -> the cached figures its final grams were added to, until written
        self._unwritten: dict[str, list[tuple[_Used, float]]] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        self._reserve_failed = False

    @property
    def read_timeout_s(self) -> float:
        """Seconds a ledger read or reservation may take (``budgets.ledger_timeout_s``)."""
        if self._read_timeout_s is not None:
            return self._read_timeout_s
        return self.cfg.ledger_timeout_s

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.users or self.cfg.teams or self.cfg.default)

    def reconfigure(self, cfg: BudgetsConfig) -> None:
        """A reloaded ``budgets`` section: cached figures and holds stay (they do not depend on
        the amounts), so requests in flight stay counted."""
        self.cfg = cfg
        if not self.enabled:
            self._cache.clear()
            self._unwritten.clear()

    def expected_g(self, shape: RequestShape) -> float:
        """Grams CO2e a request is expected to cost, from its plan and its upstream's grid now
        (what its record will be charged at)."""
        if self.estimator is None:
            return 0.0
        return self.estimator.estimate(shape).energy_j * self.g_per_j(shape.upstream)

    def reserved_g(self, scope: str, key: str) -> float:
        """Grams this process holds for a user's or team's requests in flight."""
        return self.holds.reserved_g((scope, key))

    async def check(
        self,
        identity: Identity,
        request_id: str | None = None,
        shape: RequestShape | None = None,
    ) -> None:
        """Raise ``BudgetExceeded`` when one of the caller's budgets is full (used plus
        reserved grams reach it); when several are, the one that resets last is reported (the
        caller must wait for it). Otherwise, given the request's id and shape, reserve its
        expected grams until ``observe`` sees its final record."""
        limits = limits_of(self.cfg, identity)
        if not limits:
            return
        now = self.clock()
        self.holds.expire(now)
        periods = [period_of(limit.period, now) for limit in limits]
        # one to three limits, nearly always cached: awaited in turn, no task per request
        entries = [
            await self._entry(lim.scope, lim.key, p, now)
            for lim, p in zip(limits, periods, strict=True)
        ]
        # from here to the local hold no await but the shared ledger's, which decides for all
        # processes: this process's checks always see each other's holds
        worst: BudgetExceeded | None = None
        for limit, period, entry in zip(limits, periods, entries, strict=True):
            reserved_g = self.holds.reserved_g((limit.scope, limit.key))
            if entry.used_g + reserved_g < limit.budget_g:
                continue
            err = self._exceeded(limit, period, entry.used_g, reserved_g, now)
            if worst is None or err.extra["retry_after_s"] > worst.extra["retry_after_s"]:
                worst = err
        if worst is not None:
            raise worst
        if request_id is None or shape is None:
            return
        grams = self.expected_g(shape)
        if self.ledger.shared_reservations:
            await self._reserve_shared(request_id, grams, limits, periods, entries, now)
        owners = tuple(dict.fromkeys((limit.scope, limit.key) for limit in limits))
        expires_at = now + timedelta(seconds=self.cfg.reservation_ttl_s)
        self.holds.add(Hold(request_id, grams, owners, expires_at))

    @staticmethod
    def _exceeded(
        limit: Limit, period: Period, used_g: float, reserved_g: float, now: datetime
    ) -> BudgetExceeded:
        retry_after_s = max(1, math.ceil((period.resets_at - now).total_seconds()))
        when = "today (UTC)" if limit.period == "day" else "this month (UTC)"
        retry = f"it resets in {retry_after_s} s"
        held = ""
        if reserved_g:
            held = f", including {reserved_g:.4g} g reserved by requests in flight"
        if used_g < limit.budget_g:  # full only with requests in flight: they may end under it
            retry_after_s = min(retry_after_s, RESERVED_RETRY_S)
            retry = f"retry in {retry_after_s} s"
        return BudgetExceeded(
            f"carbon budget of {limit.scope} {limit.key!r} is exhausted: "
            f"{used_g + reserved_g:.4g} g CO2e used {when}{held}, of {limit.budget_g:g} g; "
            f"{retry}",
            budget_g=limit.budget_g,
            used_g=round(used_g + reserved_g, 6),
            scope=limit.scope,
            period=limit.period,
            retry_after_s=retry_after_s,
        )

    async def _reserve_shared(
        self,
        request_id: str,
        grams: float,
        limits: Sequence[Limit],
        periods: Sequence[Period],
        entries: Sequence[_Used],
        now: datetime,
    ) -> None:
        """Check and hold in the ledger, for the user and then the team. A refusal releases
        what was held; a failed ledger admits (budgets fail open: a hold made all the same is
        released when the request's record is written)."""
        groups: dict[Owner, list[int]] = {}
        for i, limit in enumerate(limits):
            groups.setdefault((limit.scope, limit.key), []).append(i)
        day = now.astimezone(UTC).date().isoformat()
        asked: list[Owner] = []
        try:
            for (scope, key), indexes in groups.items():
                asked.append((scope, key))  # before the await: a cancelled call may have held
                wanted = [
                    PeriodLimit(limits[i].period, limits[i].budget_g, entries[i].ledger_g)
                    for i in indexes
                ]
                try:
                    async with asyncio.timeout(self.read_timeout_s):
                        refusal = await self.ledger.reserve(
                            scope, key, request_id, grams, wanted, day, self.cfg.reservation_ttl_s
                        )
                except (LedgerError, TimeoutError) as e:
                    if not self._reserve_failed:
                        log.warning(
                            "cannot reserve in the ledger for %s %r (admitted on this process's "
                            "figures): %s",
                            scope,
                            key,
                            e or f"no answer within {self.read_timeout_s} s",
                        )
                    self._reserve_failed = True
                    continue
                self._reserve_failed = False
                if refusal is not None:
                    asked.pop()  # refused: nothing held there
                    await self._release_shared(request_id, asked)
                    asked.clear()
                    i = indexes[refusal.index]
                    raise self._exceeded(
                        limits[i], periods[i], refusal.used_g, refusal.reserved_g, now
                    )
        except asyncio.CancelledError:
            # the client left while the ledger held for it: no record will release that
            if asked:
                task = asyncio.ensure_future(self._release_shared(request_id, list(asked)))
                self._releasing.add(task)
                task.add_done_callback(self._releasing.discard)
            raise

    def abandon(self, request_id: str) -> None:
        """An admitted request that will have no record (a worker's client left between its
        admission and its start): its hold is released, in the shared ledger too."""
        hold = self.holds.release(request_id)
        if hold is not None and self.ledger.shared_reservations:
            task = asyncio.ensure_future(self._release_shared(request_id, hold.owners))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _release_shared(self, request_id: str, owners: Iterable[Owner]) -> None:
        for scope, key in owners:
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    await self.ledger.release(scope, key, request_id)
            except (LedgerError, TimeoutError) as e:
                log.warning(
                    "cannot release a reservation of %s %r (it expires in %g s): %s",
                    scope,
                    key,
                    self.cfg.reservation_ttl_s,
                    e or f"no answer within {self.read_timeout_s} s",
                )

    async def drain(self) -> None:
        """Wait for the releases sent on behalf of cancelled checks."""
        while self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    def observe(self, record: RequestRecord) -> None:
        """A final record of this process: its hold is released and its grams count as used
        (added to the cached figures it belongs to, until the ledger has it)."""
        if self.holds:
            self.holds.release(record.request_id)
        if not record.co2e_g or not self._cache:
            return
        day = record.day
        added: list[tuple[_Used, float]] = []
        for (scope, key, _, _), entry in self._cache.items():
            mine = (scope == "user" and key == record.user) or (
                scope == "team" and key == record.team
            )
            if mine and entry.start_day <= day <= entry.end_day:
                entry.local_g += record.co2e_g
                added.append((entry, record.co2e_g))
        if added:
            self._unwritten.setdefault(record.request_id, []).extend(added)

    def written(self, records: Sequence[RequestRecord]) -> None:
        """Records the ledger has stored: the next read of it counts them, so they leave the
        local figures then (not before: a read may come before the write)."""
        if not self._unwritten:
            return
        for record in records:
            for entry, grams in self._unwritten.pop(record.request_id, ()):
                entry.written_g += grams

    async def used_g(self, scope: str, key: str, period: str) -> float:
        """Grams used by a user or team in the current day or month, as the check sees them
        (without reservations)."""
        now = self.clock()
        return (await self._entry(scope, key, period_of(period, now), now)).used_g

    async def _entry(self, scope: str, key: str, period: Period, now: datetime) -> _Used:
        ck = (scope, key, period.start_day.isoformat(), period.end_day.isoformat())
        entry = self._cache.get(ck)
        if entry is None:
            entry = self._cache[ck] = _Used(ck[2], ck[3])
            self._prune(ck[3])
        elif entry.checked_at is not None:
            fresh_s = max(self.cfg.cache_s, FAILED_RETRY_S if entry.failed else 0.0)
            if (now - entry.checked_at).total_seconds() < fresh_s:
                return entry
        task = self._refreshing.get(ck)
        if task is None:
            task = asyncio.ensure_future(self._refresh(ck, entry, now))
            self._refreshing[ck] = task
            task.add_done_callback(lambda _: self._refreshing.pop(ck, None))
        await asyncio.shield(task)
        return entry

    async def _refresh(self, ck: CacheKey, entry: _Used, now: datetime) -> float:
        scope, key, start_day, end_day = ck
        written_before_g = entry.written_g
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
        # what the ledger had stored before the read is in its figure now; records final
        # here but not written yet, or written while the read ran, stay local until next time
        entry.local_g -= written_before_g
        entry.written_g -= written_before_g
        return entry.used_g

    def _prune(self, today: str) -> None:
        """Forget periods that are over."""
        over = [ck for ck, e in self._cache.items() if e.end_day < today]
        for ck in over:
            del self._cache[ck]
        if over and self._unwritten:
            live = {id(e) for e in self._cache.values()}
            self._unwritten = {
                rid: kept
                for rid, added in self._unwritten.items()
                if (kept := [(e, g) for e, g in added if id(e) in live])
            }
