"""The SQLite ledger: totals equal the records, exactly once per request id, reads, errors."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.errors import ConfigError, LedgerError
from proxy.ledger.base import open_ledger
from proxy.ledger.sqlite import SQLiteLedger
from tests.helpers.ledger_data import (
    check_exactly_once,
    check_get,
    check_impacts_aggregated,
    check_totals_equal_records,
    record,
)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SQLiteLedger]:
    led = SQLiteLedger(str(tmp_path / "ledger.db"))
    await led.open()
    yield led
    await led.close()


async def test_totals_equal_the_sum_of_records(ledger: SQLiteLedger) -> None:
    await check_totals_equal_records(ledger)


async def test_retried_batches_count_once(ledger: SQLiteLedger) -> None:
    await check_exactly_once(ledger)


async def test_embodied_and_water_aggregated(ledger: SQLiteLedger) -> None:
    await check_impacts_aggregated(ledger)


async def test_a_ledger_made_before_embodied_and_water_gains_their_columns(
    tmp_path: Path,
) -> None:
    """A ledger file whose ``daily`` table predates the embodied and water columns keeps its
    rows and gains the columns (0) on open, then aggregates them."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_DAILY)
    conn.execute(
        "INSERT INTO daily VALUES ('2026-11-28', 'alice', 'research', 'text-generation',"
        " 'llama-3.1-8b', 'llm', 1, 2.0, 0.5, 3, 5, 2.0)"
    )
    conn.commit()
    conn.close()
    led = SQLiteLedger(str(path))
    await led.open()
    try:
        (old,) = await led.aggregates("2026-11-28", "2026-11-28")
        assert (old.requests, old.embodied_requests, old.water_l) == (1, 0, 0.0)
        await check_impacts_aggregated(led)
    finally:
        await led.close()


#: The ``daily`` table as released before the embodied and water columns.
OLD_DAILY = """
CREATE TABLE daily (
    day TEXT NOT NULL, user TEXT NOT NULL, team TEXT NOT NULL, task TEXT NOT NULL,
    model TEXT NOT NULL, upstream TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    energy_j REAL NOT NULL DEFAULT 0, co2e_g REAL NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    measured_energy_j REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user, team, task, model, upstream)
);
"""


async def test_get_returns_the_stored_record(ledger: SQLiteLedger) -> None:
    await check_get(ledger)


async def test_records_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ledger.db"
    path.parent.mkdir()  # the ledger never creates its folder
    first = SQLiteLedger(str(path))
    await first.open()
    await first.write([record("keep-1", co2e_g=0.25), record("keep-2", co2e_g=0.5)])
    await first.close()
    again = SQLiteLedger(str(path))
    await again.open()
    try:
        assert await again.write([record("keep-1", co2e_g=0.25)]) == 0
        assert await again.used_g("user", "alice", "2026-11-29", "2026-11-29") == 0.75
    finally:
        await again.close()


def test_open_ledger_picks_the_backend_by_scheme(tmp_path: Path) -> None:
    led = open_ledger(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(led, SQLiteLedger)
    assert led.path == str(tmp_path / "x.db")
    with pytest.raises(ConfigError, match="unsupported scheme"):
        open_ledger("postgres://127.0.0.1/x")


async def test_unusable_path_raises_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    led = SQLiteLedger(str(blocker / "ledger.db"))
    with pytest.raises(LedgerError):
        await led.write([record("x")])
