"""The shared ledger on Redis, for several proxy replicas (``redis://`` and ``rediss://``).

Keys are laid out for Redis Cluster: everything one user's write touches shares the hash tag
``{u:<user>}``, so one Lua script can check-and-increment it atomically in one slot::

    <prefix>:{u:<user>}:day:<YYYY-MM-DD>   hash   "<metric>|<group>" -> running total
    <prefix>:{u:<user>}:days               zset   day -> YYYYMMDD (the user's days with data)
    <prefix>:{u:<user>}:seen:<request id>  string set once per request id (exactly-once marker)
    <prefix>:{u:<user>}:spent:<YYYY-MM>    hash   day -> grams CO2e (budgets)
    <prefix>:{u:<user>}:held               hash   request id -> grams reserved; "=total" (budgets)
    <prefix>:{u:<user>}:held:exp           zset   request id -> when its reservation expires (ms)
    <prefix>:rec:<request id>              string the record as JSON, expires with retention
    <prefix>:users                         set    every user with data
    <prefix>:{t:<team>}:users              set    the users who sent requests for the team
    <prefix>:{t:<team>}:seen:<request id>  string the team's exactly-once marker (budgets)
    <prefix>:{t:<team>}:spent:<YYYY-MM>    hash   as the user's, for the team
    <prefix>:{t:<team>}:held, held:exp            as the user's, for the team

``<group>`` is the JSON list ``[task, model, upstream, team]``; ``<metric>`` is one of
``METRICS``. User, team and request id are percent-encoded in key names, so braces and colons in
them can neither move a key to another slot nor make two keys collide. The record (``SET NX``:
the first writer of a request id wins, as in SQLite), user and team keys are idempotent writes;
only the scripts count, and each counts a request id once per user and once per team.

Budgets: ``reserve`` checks a user's (or a team's) grams spent plus those held by admitted
requests in flight against its budgets and holds the new request's grams, in one script on
that user's (team's) slot, so replicas cannot admit past a budget together. The script that
writes a record releases its holds and adds its grams to ``spent`` in the same step: a request
is always counted once, held or spent. A hold whose replica died expires after its TTL.

A ``key_prefix`` query parameter (``redis://host:6379/0?key_prefix=wp-staging``) lets several
deployments share one Redis. redis-py errors become ``LedgerError`` here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from proxy.errors import LedgerError
from proxy.ledger.base import AggregateRow, Ledger, PeriodLimit, Refusal, redacted_url
from proxy.records import RequestRecord, dumps_doc

DEFAULT_KEY_PREFIX = "wp"
SOCKET_TIMEOUT_S = 2.0  # one command's reply
SOCKET_CONNECT_TIMEOUT_S = 1.0  # one TCP (and TLS) connect
HEALTH_CHECK_INTERVAL_S = 15  # PING an idle pooled connection before reuse
MAX_CONNECTIONS = 64  # per process; callers beyond it wait for a free connection
POOL_TIMEOUT_S = 2.0  # longest wait for a free pooled connection
COMMAND_RETRY_BASE_S = 0.05  # first backoff of redis-py's own retry
COMMAND_RETRY_CAP_S = 0.5  # longest backoff of redis-py's own retry
COMMAND_RETRIES = 2  # retries of one command on connection errors (the writer retries further)
#: Daily aggregates outlive records (reports and monthly budgets read them), at least this long.
MIN_AGGREGATE_RETENTION_DAYS = 400
S_PER_DAY = 86_400
#: Budgets' per-month counters (and the team's exactly-once markers) outlive their month by this
#: much: a monthly budget reads the current month only.
SPENT_TTL_S = 62 * S_PER_DAY
#: The field of a ``held`` hash with the sum of its holds (request ids are encoded: no "=").
HELD_TOTAL = "=total"

#: Hash field prefixes, in AggregateRow order.
METRICS = (
    "requests",
    "energy_j",
    "co2e_g",
    "prompt_tokens",
    "completion_tokens",
    "measured_energy_j",
    "embodied_co2e_g",
    "embodied_requests",
    "water_l",
    "water_requests",
)
_INT_METRICS = frozenset(
    ("requests", "prompt_tokens", "completion_tokens", "embodied_requests", "water_requests")
)

#: Lua: drop one request's hold (KEYS held hash and its expiry zset); the keys go with the last.
_RELEASE = """
local function release(held, exp, rid)
  local g = redis.call('HGET', held, rid)
  if not g then
    return
  end
  redis.call('HDEL', held, rid)
  redis.call('ZREM', exp, rid)
  if redis.call('HLEN', held) <= 1 then
    redis.call('DEL', held, exp)
  else
    redis.call('HINCRBYFLOAT', held, '=total', -tonumber(g))
  end
end
"""

#: KEYS: seen marker, day hash, days zset, spent hash of the day's month, held hash, held expiries.
#: ARGV: seen ttl s, aggregate ttl s, day, day score, oldest kept score, group, then the figures
#: energy_j, co2e_g, prompt_tokens, completion_tokens, measured_energy_j; request id field,
#: spent ttl s, then embodied_co2e_g, embodied_requests, water_l, water_requests.
#: Returns 1 when the request id was new (and counted), 0 when it was already counted.
RECORD_SCRIPT = (
    _RELEASE
    + """
release(KEYS[5], KEYS[6], ARGV[12])
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then
  return 0
end
local g = ARGV[6]
redis.call('HINCRBY', KEYS[2], 'requests|' .. g, 1)
redis.call('HINCRBYFLOAT', KEYS[2], 'energy_j|' .. g, ARGV[7])
redis.call('HINCRBYFLOAT', KEYS[2], 'co2e_g|' .. g, ARGV[8])
redis.call('HINCRBY', KEYS[2], 'prompt_tokens|' .. g, ARGV[9])
redis.call('HINCRBY', KEYS[2], 'completion_tokens|' .. g, ARGV[10])
redis.call('HINCRBYFLOAT', KEYS[2], 'measured_energy_j|' .. g, ARGV[11])
if ARGV[15] ~= '0' then
  redis.call('HINCRBYFLOAT', KEYS[2], 'embodied_co2e_g|' .. g, ARGV[14])
  redis.call('HINCRBY', KEYS[2], 'embodied_requests|' .. g, ARGV[15])
end
if ARGV[17] ~= '0' then
  redis.call('HINCRBYFLOAT', KEYS[2], 'water_l|' .. g, ARGV[16])
  redis.call('HINCRBY', KEYS[2], 'water_requests|' .. g, ARGV[17])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[4], ARGV[3], ARGV[8])
redis.call('EXPIRE', KEYS[4], ARGV[13])
return 1
"""
)

#: The team's side of a record (another slot): KEYS: the team's seen marker, spent hash of the
#: day's month, held hash, held expiries. ARGV: seen ttl s, spent ttl s, day, co2e_g, request id
#: field. Returns 1 when counted, 0 when already counted.
TEAM_RECORD_SCRIPT = (
    _RELEASE
    + """
release(KEYS[3], KEYS[4], ARGV[5])
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then
  return 0
end
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
)

#: Check and hold, for one user or team. KEYS: spent hash of this month, held hash, held
#: expiries. ARGV: request id field, grams, ttl ms, today, then per limit: "day" or "month",
#: budget g, known g (a floor: the caller's read of the aggregates). Expired holds are dropped
#: first. Returns {0, used, held} when the grams were held, else {n, used, held} for the first
#: limit n (from 1) whose used plus held grams reach its budget; nothing is held then.
RESERVE_SCRIPT = (
    _RELEASE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  release(KEYS[2], KEYS[3], rid)
end
local held = tonumber(redis.call('HGET', KEYS[2], '=total') or '0')
local day_g = tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or '0')
local month_g = nil
local used = 0
for i = 5, #ARGV, 3 do
  used = day_g
  if ARGV[i] == 'month' then
    if month_g == nil then
      month_g = 0
      for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
        month_g = month_g + tonumber(v)
      end
    end
    used = month_g
  end
  used = math.max(used, tonumber(ARGV[i + 2]))
  if used + held >= tonumber(ARGV[i + 1]) then
    return {(i - 2) / 3, tostring(used), tostring(held)}
  end
end
local ttl = tonumber(ARGV[3])
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[2], '=total', ARGV[2])
redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
for k = 2, 3 do
  if redis.call('PTTL', KEYS[k]) < ttl then
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
end
return {0, tostring(used), tostring(held)}
"""
)

#: KEYS: held hash, held expiries. ARGV: request id field.
RELEASE_SCRIPT = (
    _RELEASE
    + """
release(KEYS[1], KEYS[2], ARGV[1])
return 1
"""
)


def _enc(value: str) -> str:
    return quote(value, safe="")


def _day_score(day: str) -> int:
    return int(day.replace("-", ""))


def _split_url(url: str) -> tuple[str, str]:
    """The URL for redis-py and the key prefix taken out of its query string."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_KEY_PREFIX
    rest = []
    for name, value in query:
        if name == "key_prefix":
            prefix = value
        else:
            rest.append((name, value))
    if not prefix or "{" in prefix or "}" in prefix:
        raise LedgerError(f"ledger.url: key_prefix must be non-empty, without braces: {prefix!r}")
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """redis-py's errors (and the socket's) as ``LedgerError``."""
    try:
        yield
    except (RedisError, OSError) as e:
        raise LedgerError(f"Redis ledger: {what}: {type(e).__name__}: {e}") from e


class RedisLedger(Ledger):
    backend = "redis"
    shared_reservations = True

    def __init__(
        self,
        url: str,
        retention_days: int = 90,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        self.url = url
        self.retention_days = retention_days
        self.key_prefix = key_prefix
        self._client: aioredis.Redis | None = None
        self._script: Any = None
        self._team_script: Any = None
        self._reserve_script: Any = None
        self._release_script: Any = None

    @classmethod
    def from_url(cls, url: str, retention_days: int = 90) -> RedisLedger:
        """``redis://[user:pass@]host:port/db`` or ``rediss://``; ``?key_prefix=`` optional."""
        client_url, prefix = _split_url(url)
        return cls(client_url, retention_days, prefix)

    # -- keys ----------------------------------------------------------------------------------

    def _user_key(self, user: str, suffix: str) -> str:
        return f"{self.key_prefix}:{{u:{_enc(user)}}}:{suffix}"

    def _day_key(self, user: str, day: str) -> str:
        return self._user_key(user, f"day:{day}")

    def _days_key(self, user: str) -> str:
        return self._user_key(user, "days")

    def _seen_key(self, user: str, request_id: str) -> str:
        return self._user_key(user, f"seen:{_enc(request_id)}")

    def _record_key(self, request_id: str) -> str:
        return f"{self.key_prefix}:rec:{_enc(request_id)}"

    def _users_key(self) -> str:
        return f"{self.key_prefix}:users"

    def _team_key(self, team: str) -> str:
        return self._scope_key("team", team, "users")

    def _scope_key(self, scope: str, key: str, suffix: str) -> str:
        """A key in the slot of a user (``scope`` "user") or of a team."""
        tag = "u" if scope == "user" else "t"
        return f"{self.key_prefix}:{{{tag}:{_enc(key)}}}:{suffix}"

    def _spent_key(self, scope: str, key: str, day: str) -> str:
        return self._scope_key(scope, key, f"spent:{day[:7]}")

    def _held_keys(self, scope: str, key: str) -> list[str]:
        return [self._scope_key(scope, key, "held"), self._scope_key(scope, key, "held:exp")]

    # -- lifecycle -----------------------------------------------------------------------------

    def _connect(self) -> aioredis.Redis:
        if self._client is None:
            try:
                pool = aioredis.BlockingConnectionPool.from_url(
                    self.url,
                    max_connections=MAX_CONNECTIONS,
                    timeout=POOL_TIMEOUT_S,
                    socket_timeout=SOCKET_TIMEOUT_S,
                    socket_connect_timeout=SOCKET_CONNECT_TIMEOUT_S,
                    health_check_interval=HEALTH_CHECK_INTERVAL_S,
                    retry=Retry(
                        ExponentialBackoff(cap=COMMAND_RETRY_CAP_S, base=COMMAND_RETRY_BASE_S),
                        COMMAND_RETRIES,
                    ),
                    retry_on_error=[RedisConnectionError, RedisTimeoutError],
                    decode_responses=True,
                )
                client = aioredis.Redis(connection_pool=pool)
            except (ValueError, RedisError) as e:
                raise LedgerError(f"ledger.url: cannot use {redacted_url(self.url)!r}: {e}") from e
            self._script = client.register_script(RECORD_SCRIPT)
            self._team_script = client.register_script(TEAM_RECORD_SCRIPT)
            self._reserve_script = client.register_script(RESERVE_SCRIPT)
            self._release_script = client.register_script(RELEASE_SCRIPT)
            self._client = client
        return self._client

    async def open(self) -> None:
        """Build the client; connections are made on first use, so a Redis that is down at
        startup delays the ledger (the writer spools) instead of stopping the proxy."""
        self._connect()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
                await client.connection_pool.disconnect()

    async def ping(self) -> bool:
        try:
            with _translated("ping"):
                return bool(await self._connect().ping())
        except LedgerError:
            return False

    # -- writes --------------------------------------------------------------------------------

    @property
    def _aggregate_ttl_s(self) -> int:
        return max(self.retention_days, MIN_AGGREGATE_RETENTION_DAYS) * S_PER_DAY

    async def write(self, records: Sequence[RequestRecord]) -> int:
        if not records:
            return 0
        client = self._connect()
        record_ttl_s = self.retention_days * S_PER_DAY
        agg_ttl_s = self._aggregate_ttl_s
        oldest = datetime.now(UTC).date() - timedelta(days=agg_ttl_s // S_PER_DAY)
        oldest_score = _day_score(oldest.isoformat())
        with _translated(f"write {len(records)} records"):
            async with client.pipeline(transaction=False) as pipe:
                for r in records:
                    pipe.set(
                        self._record_key(r.request_id),
                        dumps_doc(r.to_dict()),
                        ex=record_ttl_s,
                        nx=True,
                    )
                    pipe.sadd(self._users_key(), r.user)
                    if r.team:
                        pipe.sadd(self._team_key(r.team), r.user)
                    group = json.dumps([r.task, r.model or "", r.upstream, r.team or ""])
                    measured_j = r.energy_j if r.source == "measured" else 0.0
                    rid = _enc(r.request_id)
                    co2e_g = repr(float(r.co2e_g))
                    await self._script(
                        keys=[
                            self._seen_key(r.user, r.request_id),
                            self._day_key(r.user, r.day),
                            self._days_key(r.user),
                            self._spent_key("user", r.user, r.day),
                            *self._held_keys("user", r.user),
                        ],
                        args=[
                            record_ttl_s,
                            agg_ttl_s,
                            r.day,
                            _day_score(r.day),
                            oldest_score,
                            group,
                            repr(float(r.energy_j)),
                            co2e_g,
                            int(r.prompt_tokens or 0),
                            int(r.completion_tokens or 0),
                            repr(float(measured_j)),
                            rid,
                            SPENT_TTL_S,
                            repr(float(r.embodied_co2e_g or 0.0)),
                            int(r.embodied_co2e_g is not None),
                            repr(float(r.water_l or 0.0)),
                            int(r.water_l is not None),
                        ],
                        client=pipe,
                    )
                    if r.team:
                        await self._team_script(
                            keys=[
                                self._scope_key("team", r.team, f"seen:{rid}"),
                                self._spent_key("team", r.team, r.day),
                                *self._held_keys("team", r.team),
                            ],
                            args=[SPENT_TTL_S, SPENT_TTL_S, r.day, co2e_g, rid],
                            client=pipe,
                        )
                results = await pipe.execute()
        # each record queued SET and SADD (and SADD for a team) before its script's reply, and
        # its team's script after it
        new = 0
        i = 0
        for r in records:
            i += 3 if r.team else 2
            new += int(results[i])
            i += 2 if r.team else 1
        return new

    # -- budgets -------------------------------------------------------------------------------

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
        args: list[Any] = [_enc(request_id), repr(float(grams)), max(1, round(ttl_s * 1000)), day]
        for limit in limits:
            args += [limit.period, repr(float(limit.budget_g)), repr(float(limit.known_g))]
        self._connect()
        with _translated(f"reserve for {scope} {key!r}"):
            index, used_g, held_g = await self._reserve_script(
                keys=[self._spent_key(scope, key, day), *self._held_keys(scope, key)], args=args
            )
        if int(index) == 0:
            return None
        return Refusal(int(index) - 1, float(used_g), float(held_g))

    async def release(self, scope: str, key: str, request_id: str) -> None:
        self._connect()
        with _translated(f"release for {scope} {key!r}"):
            await self._release_script(keys=self._held_keys(scope, key), args=[_enc(request_id)])

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, request_id: str) -> RequestRecord | None:
        with _translated(f"get {request_id!r}"):
            doc = await self._connect().get(self._record_key(request_id))
        if doc is None:
            return None
        try:
            return RequestRecord.from_dict(json.loads(doc))
        except (ValueError, TypeError) as e:
            raise LedgerError(f"Redis ledger: record {request_id!r} is not valid: {e}") from e

    async def users(self, team: str | None = None) -> list[str]:
        """Every user with data, or the users who sent requests for ``team``."""
        key = self._team_key(team) if team is not None else self._users_key()
        with _translated("list users"):
            members = await self._connect().smembers(key)
        return sorted(str(m) for m in members)

    async def aggregates(
        self, start_day: str, end_day: str, user: str | None = None, team: str | None = None
    ) -> list[AggregateRow]:
        users = [user] if user is not None else await self.users(team)
        if not users:
            return []
        client = self._connect()
        lo, hi = _day_score(start_day), _day_score(end_day)
        with _translated("read aggregates"):
            async with client.pipeline(transaction=False) as pipe:
                for u in users:
                    pipe.zrangebyscore(self._days_key(u), lo, hi)
                days_of = await pipe.execute()
            wanted = [
                (u, d)
                for u, days in zip(users, days_of, strict=True)
                for d in sorted(days)
                if start_day <= d <= end_day
            ]
            if not wanted:
                return []
            async with client.pipeline(transaction=False) as pipe:
                for u, d in wanted:
                    pipe.hgetall(self._day_key(u, d))
                hashes = await pipe.execute()
        rows: list[AggregateRow] = []
        for (u, d), fields in zip(wanted, hashes, strict=True):
            rows.extend(r for r in _rows(d, u, fields) if team is None or r.team == team)
        rows.sort(key=lambda r: (r.day, r.user, r.task, r.model or "", r.upstream, r.team or ""))
        return rows


def _rows(day: str, user: str, fields: dict[str, str]) -> list[AggregateRow]:
    """One day hash as rows, one per group."""
    groups: dict[str, dict[str, str]] = {}
    for name, value in fields.items():
        metric, _, group = name.partition("|")
        if metric in METRICS:
            groups.setdefault(group, {})[metric] = value
    rows = []
    for group, values in groups.items():
        try:
            task, model, upstream, team = json.loads(group)
        except (ValueError, TypeError):
            continue
        figures: dict[str, Any] = {
            m: int(values.get(m, "0")) if m in _INT_METRICS else float(values.get(m, "0"))
            for m in METRICS
        }
        rows.append(
            AggregateRow(
                day=day,
                user=user,
                team=team or None,
                task=task,
                model=model or None,
                upstream=upstream,
                **figures,
            )
        )
    return rows
