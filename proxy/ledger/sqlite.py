"""The default ledger: one SQLite file in WAL mode, written from a worker thread.

Records are inserted with their request id as primary key; the daily aggregate is updated in the
same transaction only when the insert was new, so a retried batch is applied exactly once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from proxy.errors import LedgerError
from proxy.ledger.base import AggregateRow, Ledger
from proxy.records import RequestRecord, dumps_doc

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    request_id TEXT PRIMARY KEY,
    day TEXT NOT NULL,
    user TEXT NOT NULL,
    team TEXT,
    ended_at TEXT,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_day ON records(day);
CREATE TABLE IF NOT EXISTS daily (
    day TEXT NOT NULL,
    user TEXT NOT NULL,
    team TEXT NOT NULL,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    energy_j REAL NOT NULL DEFAULT 0,
    co2e_g REAL NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    measured_energy_j REAL NOT NULL DEFAULT 0,
    embodied_co2e_g REAL NOT NULL DEFAULT 0,
    embodied_requests INTEGER NOT NULL DEFAULT 0,
    water_l REAL NOT NULL DEFAULT 0,
    water_requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user, team, task, model, upstream)
);
CREATE INDEX IF NOT EXISTS daily_user ON daily(user, day);
CREATE INDEX IF NOT EXISTS daily_team ON daily(team, day);
"""

UPSERT_DAILY = """
INSERT INTO daily (day, user, team, task, model, upstream, requests, energy_j, co2e_g,
                   prompt_tokens, completion_tokens, measured_energy_j, embodied_co2e_g,
                   embodied_requests, water_l, water_requests)
VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, user, team, task, model, upstream) DO UPDATE SET
    requests = requests + 1,
    energy_j = energy_j + excluded.energy_j,
    co2e_g = co2e_g + excluded.co2e_g,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    measured_energy_j = measured_energy_j + excluded.measured_energy_j,
    embodied_co2e_g = embodied_co2e_g + excluded.embodied_co2e_g,
    embodied_requests = embodied_requests + excluded.embodied_requests,
    water_l = water_l + excluded.water_l,
    water_requests = water_requests + excluded.water_requests
"""

#: Columns added to ``daily`` after its first release: a ledger file made before gets them.
ADDED_DAILY_COLUMNS = (
    ("embodied_co2e_g", "REAL"),
    ("embodied_requests", "INTEGER"),
    ("water_l", "REAL"),
    ("water_requests", "INTEGER"),
)


def _migrate(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(daily)")}
    for name, kind in ADDED_DAILY_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE daily ADD COLUMN {name} {kind} NOT NULL DEFAULT 0")


class SQLiteLedger(Ledger):
    backend = "sqlite"

    def __init__(self, path: str, retention_days: int = 90) -> None:
        self.path = path
        self.retention_days = retention_days
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._writes = 0

    @classmethod
    def from_url(cls, url: str, retention_days: int = 90) -> SQLiteLedger:
        """``sqlite:///rel/path.db`` (relative) or ``sqlite:////abs/path.db``."""
        path = url.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise LedgerError(f"ledger.url {url!r} names no file")
        return cls(path, retention_days)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            folder = Path(self.path).absolute().parent
            if self.path != ":memory:" and not folder.is_dir():  # never created for the ledger
                raise LedgerError(
                    f"ledger.url: the folder {folder} for the SQLite ledger does not exist"
                )
            try:
                conn = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(SCHEMA)
                _migrate(conn)
            except (sqlite3.Error, OSError) as e:
                raise LedgerError(f"cannot open SQLite ledger {self.path}: {e}") from e
            self._conn = conn
        return self._conn

    async def open(self) -> None:
        await asyncio.to_thread(self._locked, self._connect)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.to_thread(self._locked, _close)

    def _locked(self, fn, *args):  # type: ignore[no-untyped-def]
        with self._lock:
            return fn(*args)

    def _write(self, records: Sequence[RequestRecord]) -> int:
        conn = self._connect()
        daily: list[tuple[object, ...]] = []  # the aggregate updates of the new records
        try:
            with conn:
                for r in records:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO records (request_id, day, user, team, ended_at, doc)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (r.request_id, r.day, r.user, r.team, r.ended_at, dumps_doc(r.to_dict())),
                    )
                    if cur.rowcount != 1:
                        continue
                    measured = r.energy_j if r.source == "measured" else 0.0
                    daily.append(
                        (
                            r.day,
                            r.user,
                            r.team or "",
                            r.task,
                            r.model or "",
                            r.upstream,
                            r.energy_j,
                            r.co2e_g,
                            r.prompt_tokens or 0,
                            r.completion_tokens or 0,
                            measured,
                            r.embodied_co2e_g or 0.0,
                            int(r.embodied_co2e_g is not None),
                            r.water_l or 0.0,
                            int(r.water_l is not None),
                        )
                    )
                conn.executemany(UPSERT_DAILY, daily)  # same transaction, same order
            self._writes += 1
            if self._writes % 1000 == 0:
                self._prune(conn)
        except sqlite3.Error as e:
            raise LedgerError(f"SQLite ledger {self.path}: {e}") from e
        return len(daily)

    def _prune(self, conn: sqlite3.Connection) -> None:
        cutoff = (datetime.now(UTC) - timedelta(days=self.retention_days)).date().isoformat()
        with conn:
            conn.execute("DELETE FROM records WHERE day < ?", (cutoff,))

    async def write(self, records: Sequence[RequestRecord]) -> int:
        if not records:
            return 0
        return int(await asyncio.to_thread(self._locked, self._write, records))

    def _get(self, request_id: str) -> RequestRecord | None:
        try:
            row = (
                self._connect()
                .execute("SELECT doc FROM records WHERE request_id = ?", (request_id,))
                .fetchone()
            )
        except sqlite3.Error as e:
            raise LedgerError(f"SQLite ledger {self.path}: {e}") from e
        return RequestRecord.from_dict(json.loads(row[0])) if row else None

    async def get(self, request_id: str) -> RequestRecord | None:
        result: RequestRecord | None = await asyncio.to_thread(self._locked, self._get, request_id)
        return result

    def _aggregates(
        self, start_day: str, end_day: str, user: str | None, team: str | None
    ) -> list[AggregateRow]:
        sql = (
            "SELECT day, user, team, task, model, upstream, requests, energy_j, co2e_g,"
            " prompt_tokens, completion_tokens, measured_energy_j, embodied_co2e_g,"
            " embodied_requests, water_l, water_requests FROM daily"
            " WHERE day >= ? AND day <= ?"
        )
        args: list[str] = [start_day, end_day]
        if user is not None:
            sql += " AND user = ?"
            args.append(user)
        if team is not None:
            sql += " AND team = ?"
            args.append(team)
        try:
            rows = self._connect().execute(sql + " ORDER BY day", args).fetchall()
        except sqlite3.Error as e:
            raise LedgerError(f"SQLite ledger {self.path}: {e}") from e
        return [
            AggregateRow(
                day=r[0],
                user=r[1],
                team=r[2] or None,
                task=r[3],
                model=r[4] or None,
                upstream=r[5],
                requests=r[6],
                energy_j=r[7],
                co2e_g=r[8],
                prompt_tokens=r[9],
                completion_tokens=r[10],
                measured_energy_j=r[11],
                embodied_co2e_g=r[12],
                embodied_requests=r[13],
                water_l=r[14],
                water_requests=r[15],
            )
            for r in rows
        ]

    async def aggregates(
        self, start_day: str, end_day: str, user: str | None = None, team: str | None = None
    ) -> list[AggregateRow]:
        rows: list[AggregateRow] = await asyncio.to_thread(
            self._locked, self._aggregates, start_day, end_day, user, team
        )
        return rows
