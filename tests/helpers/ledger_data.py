"""Records with varied users, teams, tasks, models, days and sources, and their expected sums,
for ledger contract tests shared by the SQLite and Redis backends."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.ledger.base import AggregateRow, Ledger
from proxy.records import RequestRecord

USERS = ("alice", "bob", "carol", "we{ird}:user")
TEAMS = ("research", "search", None)
TASKS = ("text-generation", "feature-extraction", "text-to-image")
MODELS = ("llama-3.1-8b", "bge-small", None, "m|with|pipes")
DAYS = ("2026-11-27", "2026-11-28", "2026-11-29")


def record(
    request_id: str,
    user: str = "alice",
    team: str | None = "research",
    day: str = "2026-11-29",
    energy_j: float = 1.0,
    co2e_g: float = 0.5,
    task: str = "text-generation",
    model: str | None = "llama-3.1-8b",
    source: str = "measured",
    prompt_tokens: int | None = 3,
    completion_tokens: int | None = 5,
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        user=user,
        team=team,
        upstream="llm",
        model=model,
        task=task,
        status=200,
        started_at=f"{day}T10:00:00.000Z",
        ended_at=f"{day}T10:00:01.000Z",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        energy_j=energy_j,
        co2e_g=co2e_g,
        source=source,
        final=True,
    )


def random_records(n: int, seed: int = 7, prefix: str = "r") -> list[RequestRecord]:
    rng = random.Random(seed)
    return [
        record(
            f"{prefix}{i}",
            user=rng.choice(USERS),
            team=rng.choice(TEAMS),
            day=rng.choice(DAYS),
            energy_j=rng.uniform(0.01, 5000.0),
            co2e_g=rng.uniform(0.0, 2.0),
            task=rng.choice(TASKS),
            model=rng.choice(MODELS),
            source=rng.choice(("measured", "estimated")),
            prompt_tokens=rng.choice((None, rng.randint(0, 4000))),
            completion_tokens=rng.choice((None, rng.randint(0, 4000))),
        )
        for i in range(n)
    ]


@dataclass
class Sums:
    requests: int = 0
    energy_j: float = 0.0
    co2e_g: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    measured_energy_j: float = 0.0


def sum_records(records: Iterable[RequestRecord]) -> Sums:
    s = Sums()
    for r in records:
        s.requests += 1
        s.energy_j += r.energy_j
        s.co2e_g += r.co2e_g
        s.prompt_tokens += r.prompt_tokens or 0
        s.completion_tokens += r.completion_tokens or 0
        s.measured_energy_j += r.energy_j if r.source == "measured" else 0.0
    return s


def sum_rows(rows: Iterable[AggregateRow]) -> Sums:
    s = Sums()
    for r in rows:
        s.requests += r.requests
        s.energy_j += r.energy_j
        s.co2e_g += r.co2e_g
        s.prompt_tokens += r.prompt_tokens
        s.completion_tokens += r.completion_tokens
        s.measured_energy_j += r.measured_energy_j
    return s


def assert_same(rows: Iterable[AggregateRow], records: Iterable[RequestRecord]) -> None:
    got, want = sum_rows(rows), sum_records(records)
    assert got.requests == want.requests
    assert got.prompt_tokens == want.prompt_tokens
    assert got.completion_tokens == want.completion_tokens
    for name in ("energy_j", "co2e_g", "measured_energy_j"):
        g, w = getattr(got, name), getattr(want, name)
        assert abs(g - w) <= 1e-9 * max(1.0, abs(w)), f"{name}: {g} != {w}"


async def check_totals_equal_records(ledger: Ledger) -> None:
    """Totals over every slice (all, per user, per team, per day, a day range) equal the sums
    of the records written, in batches of uneven sizes."""
    records = random_records(300)
    for start in range(0, len(records), 97):
        assert await ledger.write(records[start : start + 97]) == len(records[start : start + 97])
    assert_same(await ledger.aggregates(DAYS[0], DAYS[-1]), records)
    for user in USERS:
        rows = await ledger.aggregates(DAYS[0], DAYS[-1], user=user)
        assert {r.user for r in rows} <= {user}
        assert_same(rows, [r for r in records if r.user == user])
        used = await ledger.used_g("user", user, DAYS[0], DAYS[-1])
        want = sum(r.co2e_g for r in records if r.user == user)
        assert abs(used - want) <= 1e-9 * max(1.0, want)
    for team in ("research", "search"):
        rows = await ledger.aggregates(DAYS[0], DAYS[-1], team=team)
        assert {r.team for r in rows} == {team}
        assert_same(rows, [r for r in records if r.team == team])
        used = await ledger.used_g("team", team, DAYS[1], DAYS[1])
        want = sum(r.co2e_g for r in records if r.team == team and r.day == DAYS[1])
        assert abs(used - want) <= 1e-9 * max(1.0, want)
    for day in DAYS:
        rows = await ledger.aggregates(day, day)
        assert {r.day for r in rows} == {day}
        assert_same(rows, [r for r in records if r.day == day])
    rows = await ledger.aggregates(DAYS[1], DAYS[2], user="alice")
    assert_same(rows, [r for r in records if r.user == "alice" and r.day >= DAYS[1]])
    assert await ledger.aggregates("2026-12-01", "2026-12-31") == []
    # one row per (day, user, team, task, model, upstream)
    groups = {(r.day, r.user, r.team, r.task, r.model, r.upstream) for r in records}
    assert len(await ledger.aggregates(DAYS[0], DAYS[-1])) == len(groups)


async def check_exactly_once(ledger: Ledger) -> None:
    """A batch retried whole, or overlapping a new one, counts each request id once."""
    first = random_records(40, seed=1, prefix="a")
    second = random_records(40, seed=2, prefix="b")
    assert await ledger.write(first) == 40
    assert await ledger.write(first) == 0
    assert await ledger.write(first[20:] + second) == 40
    assert await ledger.write(list(reversed(second))) == 0
    assert_same(await ledger.aggregates(DAYS[0], DAYS[-1]), first + second)


async def check_get(ledger: Ledger) -> None:
    rec = record("get-1", user="alice", energy_j=12.5, co2e_g=0.125)
    await ledger.write([rec])
    got = await ledger.get("get-1")
    assert got is not None
    assert got.request_id == "get-1"
    assert got.user == "alice"
    assert got.energy_j == 12.5
    assert got.final is True
    assert await ledger.get("no-such-request") is None


async def check_impacts_aggregated(ledger: Ledger) -> None:
    """Embodied grams and litres add up per group, with the count of records that had each;
    a record without them (``None``) adds to neither."""
    with_figures = [record(f"imp{i}") for i in range(3)]
    for i, r in enumerate(with_figures):
        r.embodied_co2e_g = 0.25 * (i + 1)
        r.water_l = 0.001 * (i + 1)
    without = record("imp-none")
    await ledger.write([*with_figures, without])
    rows = await ledger.aggregates("2026-11-29", "2026-11-29", user="alice")
    assert sum(r.requests for r in rows) == 4
    assert sum(r.embodied_requests for r in rows) == 3
    assert sum(r.water_requests for r in rows) == 3
    assert abs(sum(r.embodied_co2e_g for r in rows) - 1.5) < 1e-9
    assert abs(sum(r.water_l for r in rows) - 0.006) < 1e-12
