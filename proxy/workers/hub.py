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
from collections import deque
from collections.abc import Callable
from typing import Any

from estimators.meters import Reading
from proxy.accounting import Accountant, OpenRequest
from proxy.budgets import Budgets
from proxy.errors import BudgetExceeded
from proxy.forward import Counters
from proxy.identity import Identity
from proxy.records import RequestRecord
from proxy.usage.base import Usage
from proxy.workers import events
from proxy.workers.events import Event

log = logging.getLogger("wattproxy.workers")

#: Seconds a meter reading waits, at least, before the engine splits it: by then every
#: worker's events up to the reading's time have arrived (they go out every 5 ms, stamped with
#: their own times), so no request is missing from the interval it ran in. Under load the wait
#: grows with how late events arrive (``LATENESS_MARGIN`` times the recent worst), up to
#: ``MAX_READING_LAG_S``; a worker stalled for longer has its requests' share of that interval
#: go to the others (still conserved).
READING_LAG_S = 0.1
MAX_READING_LAG_S = 2.0
LATENESS_MARGIN = 2.0
#: Per event seen, the recent worst lateness decays by this factor (forgetting an old stall).
LATENESS_DECAY = 0.999
#: How a request is closed when its worker is gone.
PROXY_RESTART = "proxy_restart"
#: The longest event batch line read (a worker's 5 ms of events; far below it in practice).
MAX_LINE_BYTES = 64 * 1024 * 1024


class Lateness:
    """How late the workers' events arrive (applied here after their own time): the recent
    worst, which sets how long a meter reading waits for them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.worst_s = 0.0

    def saw(self, t_s: float) -> None:
        late_s = self.clock() - t_s
        decayed = self.worst_s * LATENESS_DECAY
        self.worst_s = late_s if late_s > decayed else decayed

    def reading_lag_s(self) -> float:
        lag_s = LATENESS_MARGIN * self.worst_s
        return READING_LAG_S if lag_s < READING_LAG_S else min(lag_s, MAX_READING_LAG_S)


class WorkerEvents:
    """The requests of one worker connection, and its events applied to the accountant."""

    def __init__(
        self,
        accountant: Accountant,
        counters: Counters,
        clock: Callable[[], float],
        writer: asyncio.StreamWriter | None = None,
        budgets: Budgets | None = None,
        lateness: Lateness | None = None,
    ) -> None:
        self.accountant = accountant
        self.budgets = budgets
        self.lateness = lateness if lateness is not None else Lateness(clock)
        self._checks: set[asyncio.Task[None]] = set()
        self.counters = counters
        self.clock = clock
        self.writer = writer
        self.open: dict[str, OpenRequest] = {}
        self.pid: int | None = None
        self.index: int | None = None
        #: requests whose figures so far go back at every meter interval (while open)
        self.figures_wanted: set[str] = set()
        #: requests whose final record goes back (until it is final)
        self.final_wanted: set[str] = set()
        self._out: list[Event] = []
        self._flush_armed = False

    def send(self, event: Event) -> None:
        """To the worker, batched: written once the current callbacks are done."""
        if self.writer is None or self.writer.is_closing():
            return
        self._out.append(event)
        if not self._flush_armed:
            self._flush_armed = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_armed = False
        batch, self._out = self._out, []
        if batch and self.writer is not None and not self.writer.is_closing():
            self.writer.write(events.encode(batch))

    def send_figures(self) -> None:
        """The figures so far of the open requests that want them."""
        for rid in list(self.figures_wanted):
            rec = self.accountant.provisional(rid)
            if rec is None:
                self.figures_wanted.discard(rid)
            elif rec.energy_j is not None and rec.co2e_g is not None:
                self.send([events.FIGURES, rid, rec.energy_j, rec.co2e_g, rec.source])

    def final(self, record: RequestRecord) -> None:
        if record.request_id in self.final_wanted:
            self.final_wanted.discard(record.request_id)
            doc = record.to_dict()
            doc["energy_j"], doc["co2e_g"] = record.energy_j, record.co2e_g  # not rounded
            self.send([events.FINAL, doc])

    def apply(self, event: Event) -> None:
        kind = event[0]
        acc = self.accountant
        if kind == events.TOKENS:
            req = self.open.get(event[1])
            if req is not None:
                acc.tokens(req, event[2], now=event[3])
        elif kind == events.BEGIN:
            devices, prompt_est, stream, max_tokens, images, t = event[11:]
            self.lateness.saw(t)
            record = events.record_of_begin(event)
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
            self.lateness.saw(t)
            req = self.open.pop(rid, None)
            self.figures_wanted.discard(rid)
            if req is not None:
                req.record.extra.update(extra)
                acc.end(req, status, events.usage_of(usage), outcome, now=t)
        elif kind == events.WANT:
            if event[2] & events.WANT_FIGURES and event[1] in self.open:
                self.figures_wanted.add(event[1])
            if event[2] & events.WANT_FINAL:
                self.final_wanted.add(event[1])
        elif kind == events.BUDGET:
            task = asyncio.get_running_loop().create_task(self._check(event))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
        elif kind == events.ABANDON:
            if self.budgets is not None:
                self.budgets.abandon(event[1])
        elif kind == events.COUNT:
            if event[1] in events.COUNTERS:
                getattr(self.counters, event[1])(*event[2])
        elif kind == events.HELLO:
            self.pid, self.index = event[1], event[2]

    async def _check(self, event: Event) -> None:
        """A worker's budget check, answered to it: None (admitted, its hold made) or the
        refusal. Budgets fail open: with none here, or when the check itself fails."""
        _, ask_id, user, team, rid, shape = event
        refusal: dict[str, Any] | None = None
        if self.budgets is not None:
            try:
                await self.budgets.check(
                    Identity(user=user, team=team),
                    rid,
                    None if shape is None else events.shape_of(shape),
                )
            except BudgetExceeded as err:
                refusal = {"message": err.message, "extra": err.extra}
            except Exception as e:
                log.error("budget check of worker %s failed (admitted): %r", self.pid, e)
        self.send([events.ANSWER, ask_id, refusal])

    def close_all(self) -> int:
        """The worker is gone: its open requests end now, as ``proxy_restart``."""
        now = self.clock()
        left = list(self.open.values())
        self.open.clear()
        self.figures_wanted.clear()
        self.final_wanted.clear()  # nobody to send them to
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
        budgets: the budgets the workers' checks are answered from (None: all admitted).
    """

    def __init__(
        self,
        accountant: Accountant,
        counters: Counters,
        on_hello: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        budgets: Budgets | None = None,
    ) -> None:
        self.accountant = accountant
        self.counters = counters
        self.budgets = budgets
        self.on_hello = on_hello
        self.clock = clock
        self.lateness = Lateness(clock)
        self.connections: set[WorkerEvents] = set()
        self.restarted = 0  # requests closed as proxy_restart
        self._readers: set[asyncio.Task[Any]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = WorkerEvents(
            self.accountant, self.counters, self.clock, writer, self.budgets, self.lateness
        )
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

    def final(self, record: RequestRecord) -> None:
        """A final record (``Parts.final_hooks``): back to the worker that wants it."""
        for conn in self.connections:
            if record.request_id in conn.final_wanted:
                conn.final(record)
                return

    async def send_figures(self, interval_s: float) -> None:
        """Every ``interval_s`` (the meter's), the figures so far of the requests that want
        them, to their workers."""
        while True:
            await asyncio.sleep(interval_s)
            for conn in list(self.connections):
                if conn.figures_wanted:
                    conn.send_figures()

    async def wait_closed(self, timeout_s: float = 5.0) -> None:
        """Wait until every worker connection is read to its end (the workers have exited), so
        their last events are applied; then close what is left."""
        if self._readers:
            await asyncio.wait(set(self._readers), timeout=timeout_s)
        for conn in list(self.connections):
            self.restarted += conn.close_all()


class LaggedReadings:
    """The sampler's callback in the accounting process: each reading is applied, in order,
    once it has waited ``lag_s()`` (``Lateness.reading_lag_s``: 0.1 s, more while events
    arrive later). ``immediate``: at shutdown, once every worker's last events are in,
    readings apply at once (the last one covers the last ends)."""

    def __init__(
        self,
        apply: Callable[[Reading], None],
        lag_s: Callable[[], float] = lambda: READING_LAG_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.apply = apply
        self.lag_s = lag_s
        self.clock = clock
        self.immediate = False
        self._pending: deque[tuple[float, Reading]] = deque()

    def __call__(self, reading: Reading) -> None:
        if self.immediate:
            self.flush()
            self.apply(reading)
            return
        lag_s = self.lag_s()
        self._pending.append((self.clock() + lag_s, reading))
        asyncio.get_running_loop().call_later(lag_s, self._due)

    def _due(self) -> None:
        now = self.clock()
        pending = self._pending
        while pending and pending[0][0] <= now:
            self.apply(pending.popleft()[1])

    def flush(self) -> None:
        while self._pending:
            self.apply(self._pending.popleft()[1])
