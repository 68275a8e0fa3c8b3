"""How often the ledger is touched per proxied request: batching should keep it far below one.

SQLite: a ``SQLiteLedger`` that counts its write transactions, inside a wattproxy app served
in-process. Redis: a private ``redis-server`` on a free port behind a relay that counts round
trips (each turn from the proxy's side after Redis answered), plus Redis's own
``total_commands_processed``. Either way the proxy runs the real writer, with its default batch
size and flush interval, while a client sends a fixed number of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.procs import HOST, free_port
from bench.wrk import PATH, request_body
from proxy.app import PARTS, create_app
from proxy.config import parse_config
from proxy.ledger.sqlite import SQLiteLedger
from proxy.records import RequestRecord

#: Seconds to wait for every record to reach the ledger after the last response.
FLUSH_WAIT_S = 15.0


class CountingSQLiteLedger(SQLiteLedger):
    """The SQLite ledger, counting write transactions (one per non-empty ``write``)."""

    transactions = 0

    async def write(self, records: Sequence[RequestRecord]) -> int:
        if records:
            self.transactions += 1
        return await super().write(records)


@dataclass
class Relay:
    """A TCP relay to ``target_port`` that counts request round trips across connections."""

    target_port: int
    round_trips: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        turn = {"last": "server"}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, side: str) -> None:
            try:
                while data := await src.read(65536):
                    if side == "client" and turn["last"] != "client":
                        self.round_trips += 1
                    turn["last"] = side
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, "client"), pump(up_reader, writer, "server"))


@dataclass(frozen=True, slots=True)
class LedgerTrips:
    backend: str
    requests: int
    records_written: int
    trips: int  # SQLite transactions, or Redis round trips
    commands: int | None  # Redis commands processed (None for SQLite)
    note: str = ""

    @property
    def trips_per_request(self) -> float:
        return self.trips / self.requests if self.requests else 0.0

    @property
    def commands_per_request(self) -> float | None:
        return None if self.commands is None else self.commands / self.requests


async def _load(port: int, n: int, concurrency: int) -> int:
    body = request_body(stream=False)
    ok = 0
    sem = asyncio.Semaphore(concurrency)
    url = f"http://{HOST}:{port}{PATH}"
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            nonlocal ok
            async with sem, session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                ok += resp.status == 200

        await asyncio.gather(*(one() for _ in range(n)))
    return ok


async def _serve_and_load(
    cfg_doc: dict[str, Any], n: int, concurrency: int, **parts: Any
) -> tuple[int, int, Any]:
    """Serve a wattproxy app in-process, send ``n`` requests, wait for the ledger to have them
    all. Returns (requests ok, records written, the app's parts)."""
    cfg = parse_config(cfg_doc, "bench", environ={})
    app = create_app(cfg, **parts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    p = app[PARTS]
    try:
        ok = await _load(port, n, concurrency)
        deadline = time.monotonic() + FLUSH_WAIT_S
        while p.writer.written < ok and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        written = p.writer.written
    finally:
        await runner.cleanup()
    return ok, written, p


def _cfg(upstream_url: str, ledger_url: str, folder: Path) -> dict[str, Any]:
    return {
        "listen": {"host": HOST, "port": 0},
        "upstreams": [{"name": "llm", "url": upstream_url}],
        "meter": {"kind": "simulated", "interval_ms": 100},
        "ledger": {"url": ledger_url, "spool_path": str(folder / "spool.jsonl")},
    }


async def sqlite_trips(
    upstream_url: str, folder: Path, n: int, concurrency: int = 32
) -> LedgerTrips:
    path = folder / "trips.db"
    ledger = CountingSQLiteLedger(str(path))
    ok, written, _ = await _serve_and_load(
        _cfg(upstream_url, f"sqlite:///{path}", folder), n, concurrency, ledger=ledger
    )
    return LedgerTrips("sqlite", ok, written, ledger.transactions, None)


def redis_available() -> bool:
    return (
        shutil.which("redis-server") is not None
        and importlib.util.find_spec("proxy.ledger.redis") is not None
    )


async def _redis_commands(port: int) -> int:
    """``total_commands_processed`` (the INFO call itself included)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"INFO stats\r\n")
        header = await reader.readline()  # $<length>
        body = await reader.readexactly(int(header[1:]) + 2)
    finally:
        writer.close()
    for line in body.decode().splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError("redis INFO has no total_commands_processed")


async def redis_trips(
    upstream_url: str, folder: Path, n: int, concurrency: int = 32
) -> LedgerTrips:
    port = free_port()
    data = folder / "redis"
    data.mkdir(exist_ok=True)
    argv = ["redis-server", "--bind", HOST, "--port", str(port), "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(data), "--logfile", str(data / "redis.log")]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    relay = Relay(port)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                await _redis_commands(port)
                break
            await asyncio.sleep(0.05)
        await relay.start()
        url = f"redis://{HOST}:{relay.port}/0"
        before = await _redis_commands(port)
        trips_before = relay.round_trips
        ok, written, _ = await _serve_and_load(_cfg(upstream_url, url, folder), n, concurrency)
        after = await _redis_commands(port)
        trips = relay.round_trips - trips_before
    finally:
        await relay.close()
        proc.terminate()
        proc.wait(timeout=10)
    # the two INFO calls count themselves; startup (PING, SCRIPT LOAD) and shutdown are included
    return LedgerTrips(
        "redis",
        ok,
        written,
        trips,
        after - before - 1,
        note="includes connection setup, script load and pings at start and stop",
    )
