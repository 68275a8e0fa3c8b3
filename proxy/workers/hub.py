"""The accounting process's side of the workers: each worker's event stream applied to the one
``Accountant`` (so one attribution engine sees every request on the node), and the budget check
workers ask for.

A worker whose connection ends (it exited, or was killed) has its requests still open closed as
``proxy_restart``, at the moment the connection ended: their clients' connections died with
it. An event is applied once, when it arrives, and a closed request is gone from the worker's
table, so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.accounting import Accountant, OpenRequest
from proxy.budgets import Budgets
from proxy.errors import BudgetExceeded
from proxy.forward import Counters
from proxy.identity import Identity
from proxy.records import RequestRecord
from proxy.usage.base import Usage
from proxy.workers import events
from proxy.workers.events import Event
from proxy.workers.remote import budget_shape_of

log = logging.getLogger("wattproxy.workers")

#: How a request is closed when its worker is gone.
PROXY_RESTART = "proxy_restart"
#: The longest event batch line read (a worker's 5 ms of events; far below it in practice).
MAX_LINE_BYTES = 64 * 1024 * 1024


class WorkerEvents:
    """The requests of one worker connection, and its events applied to the accountant."""

    def __init__(
        self, accountant: Accountant, counters: Counters, clock: Callable[[], float]
    ) -> None:
        self.accountant = accountant
        self.counters = counters
        self.clock = clock
        self.open: dict[str, OpenRequest] = {}
        self.pid: int | None = None
        self.index: int | None = None

    def apply(self, event: Event) -> None:
        kind = event[0]
        acc = self.accountant
        if kind == events.TOKENS:
            req = self.open.get(event[1])
            if req is not None:
                acc.tokens(req, event[2], now=event[3])
        elif kind == events.BEGIN:
            _, doc, devices, prompt_est, stream, max_tokens, images, t = event
            record = RequestRecord.from_dict(doc)
            self.open[record.request_id] = acc.begin(
                record, devices, prompt_est, stream, max_tokens, images, now=t
            )
        elif kind == events.FIRST_BYTE:
            req = self.open.get(event[1])
            if req is not None:
                req.record.status = event[2]
                acc.first_byte(req, now=event[3])
        elif kind == events.END:
            _, rid, status, usage, outcome, extra, t = event
            req = self.open.pop(rid, None)
            if req is not None:
                req.record.extra.update(extra)
                acc.end(req, status, events.usage_of(usage), outcome, now=t)
        elif kind == events.COUNT:
            if event[1] in events.COUNTERS:
                getattr(self.counters, event[1])(*event[2])
        elif kind == events.HELLO:
            self.pid, self.index = event[1], event[2]

    def close_all(self) -> int:
        """The worker is gone: its open requests end now, as ``proxy_restart``."""
        now = self.clock()
        left = list(self.open.values())
        self.open.clear()
        for req in left:
            status = req.record.status or 502
            self.accountant.end(req, status, Usage(), PROXY_RESTART, now=now)
        return len(left)


class Hub:
    """Reads every worker's events (one Unix-socket connection per worker process).

    Args:
        accountant: the process's accountant.
        counters: the metrics (routing decisions, budget rejections).
        on_hello: told a worker's pid and index once it serves.
    """

    def __init__(
        self,
        accountant: Accountant,
        counters: Counters,
        on_hello: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.accountant = accountant
        self.counters = counters
        self.on_hello = on_hello
        self.clock = clock
        self.connections: set[WorkerEvents] = set()
        self.restarted = 0  # requests closed as proxy_restart
        self._readers: set[asyncio.Task[Any]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = WorkerEvents(self.accountant, self.counters, self.clock)
        self.connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._readers.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, ConnectionError) as e:  # a line past the limit, a reset
                    log.error("worker %s: event stream broken (%s)", conn.pid, e)
                    break
                if not line:
                    break
                try:
                    batch = events.decode(line)
                except ValueError:
                    log.error("worker %s: an event batch is not JSON; skipped", conn.pid)
                    continue
                for event in batch:
                    try:
                        conn.apply(event)
                    except Exception as e:  # one bad event never stops the others
                        log.error("worker %s: event %r failed: %r", conn.pid, event[:1], e)
                    if event and event[0] == events.HELLO and self.on_hello is not None:
                        self.on_hello(conn.pid or 0, conn.index or 0)
        finally:
            self.connections.discard(conn)
            closed = conn.close_all()
            if closed:
                self.restarted += closed
                log.warning(
                    "worker %s (pid %s) is gone with %d requests in flight: closed as %s",
                    conn.index,
                    conn.pid,
                    closed,
                    PROXY_RESTART,
                )
            writer.close()
            if task is not None:
                self._readers.discard(task)

    async def wait_closed(self, timeout_s: float = 5.0) -> None:
        """Wait until every worker connection is read to its end (the workers have exited), so
        their last events are applied; then close what is left."""
        if self._readers:
            await asyncio.wait(set(self._readers), timeout=timeout_s)
        for conn in list(self.connections):
            self.restarted += conn.close_all()


def budget_handler(budgets: Budgets) -> Callable[[web.Request], Any]:
    """``POST /_wattproxy/budget`` on the accounting process's Unix socket: a worker's budget
    check, answered 200 (admitted, and held) or 429 with the error's message and fields."""

    async def check(request: web.Request) -> web.Response:
        doc = await request.json()
        who = doc["identity"]
        identity = Identity(user=who["user"], team=who.get("team"))
        shape = doc.get("shape")
        try:
            await budgets.check(
                identity,
                doc.get("request_id"),
                None if shape is None else budget_shape_of(shape),
            )
        except BudgetExceeded as err:
            return web.json_response({"message": err.message, "extra": err.extra}, status=429)
        return web.json_response({"admitted": True})

    return check
