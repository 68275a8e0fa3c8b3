"""The SQLite ledger: totals equal the records, exactly once per request id, reads, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.errors import ConfigError, LedgerError
from proxy.ledger.base import open_ledger
from proxy.ledger.sqlite import SQLiteLedger
from tests.helpers.ledger_data import (
    check_exactly_once,
    check_get,
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
