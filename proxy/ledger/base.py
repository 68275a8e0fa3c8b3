"""The ledger interface. Backends store final request records exactly once (keyed by request id)
and keep daily aggregates per user, team, task, model and upstream for reports and budgets."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.errors import ConfigError, LedgerError
from proxy.records import RequestRecord


@dataclass(frozen=True, slots=True)
class PeriodLimit:
    """One budget of a user or team, checked inside the ledger (``Ledger.reserve``)."""

    period: str  # "day" or "month"
    budget_g: float
    known_g: float  # grams the caller knows were used (its cached read): a floor for the ledger's


@dataclass(frozen=True, slots=True)
class Refusal:
    """A reservation refused: which limit (index into the limits passed), and the grams the
    ledger counts against it, used and reserved by requests in flight."""

    index: int
    used_g: float
    reserved_g: float


@dataclass(frozen=True, slots=True)
class AggregateRow:
    """One day's totals for one (user, team, task, model, upstream)."""

    day: str
    user: str
    team: str | None
    task: str
    model: str | None
    upstream: str
    requests: int
    energy_j: float
    co2e_g: float
    prompt_tokens: int
    completion_tokens: int
    measured_energy_j: float
    #: embodied grams and litres of the requests that had a figure, and how many had one (a
    #: sum over none is unknown, not 0)
    embodied_co2e_g: float = 0.0
    embodied_requests: int = 0
    water_l: float = 0.0
    water_requests: int = 0


class Ledger(abc.ABC):
    backend: str = "abstract"
    #: ``reserve`` checks and reserves atomically for every process sharing this ledger
    #: (budgets then hold admitted requests' grams there, not only in their own process)
    shared_reservations: bool = False

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and create the schema."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def write(self, records: Sequence[RequestRecord]) -> int:
        """Store final records; a request id already stored is skipped. Returns how many were new.
        Raises ``LedgerError`` when the backend cannot be reached."""

    @abc.abstractmethod
    async def get(self, request_id: str) -> RequestRecord | None:
        """One stored record."""

    @abc.abstractmethod
    async def aggregates(
        self,
        start_day: str,
        end_day: str,
        user: str | None = None,
        team: str | None = None,
    ) -> list[AggregateRow]:
        """Daily aggregates with ``start_day <= day <= end_day`` (ISO dates), optionally for one
        user or team."""

    async def used_g(self, scope: str, key: str, start_day: str, end_day: str) -> float:
        """Grams CO2e a user or team used in the period (budgets)."""
        rows = await self.aggregates(
            start_day,
            end_day,
            user=key if scope == "user" else None,
            team=key if scope == "team" else None,
        )
        return sum(r.co2e_g for r in rows)

    async def reserve(
        self,
        scope: str,
        key: str,
        request_id: str,
        grams: float,
        limits: Sequence[PeriodLimit],
        day: str,
        ttl_s: float,
    ) -> Refusal | None:
        """Atomically: refuse when a limit's used plus reserved grams reach its budget, else
        reserve ``grams`` for ``request_id`` until its record is written (``write`` releases it)
        or ``ttl_s`` has passed. ``day`` is today (UTC, ISO). Only where
        ``shared_reservations`` is true (elsewhere: ``LedgerError``). Raises ``LedgerError`` when
        the backend fails."""
        raise LedgerError(f"the {self.backend} ledger keeps no shared reservations")

    async def release(self, scope: str, key: str, request_id: str) -> None:
        """Drop the reservation of a request that will write no record."""
        raise LedgerError(f"the {self.backend} ledger keeps no shared reservations")

    async def ping(self) -> bool:
        return True


def redacted_url(url: str) -> str:
    """``url`` fit for a log: a password in it becomes ``***`` (the user name stays)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostport}").geturl()


def open_ledger(url: str, retention_days: int = 90) -> Ledger:
    """The backend for ``ledger.url``: ``sqlite:///path``, ``redis://`` / ``rediss://``."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from proxy.ledger.sqlite import SQLiteLedger

        return SQLiteLedger.from_url(url, retention_days=retention_days)
    if scheme in ("redis", "rediss"):
        try:
            from proxy.ledger.redis import RedisLedger
        except ImportError as e:  # pragma: no cover - redis is a core dependency
            raise ConfigError([f"ledger.url: redis backend unavailable: {e}"]) from e
        return RedisLedger.from_url(url, retention_days=retention_days)
    raise ConfigError([f"ledger.url: unsupported scheme {scheme!r}"])
