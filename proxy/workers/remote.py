"""A worker process's link to the accounting process: the batched event channel, the
accountant the request path talks to (``RemoteAccountant``), the counters and the budget check
it sends on, and the endpoints it passes on (``/metrics``, ``/readyz``, ``/v1/emissions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

from estimators.estimator import Estimator, RequestShape
from proxy.accounting import OpenRequest
from proxy.config import BudgetsConfig
from proxy.errors import BudgetExceeded, Overloaded
from proxy.headers import RESPONSE_DROP, filter_headers
from proxy.identity import Identity
from proxy.records import RequestRecord
from proxy.usage.base import Usage
from proxy.workers import events
from proxy.workers.events import Event

log = logging.getLogger("wattproxy.worker")

#: Seconds events wait to go out together: per-request IPC is then a few bytes of a batch; the
#: meter samples every ``meter.interval_ms`` (100 ms by default), and the events carry their
#: own times, so this delay moves no joule.
FLUSH_S = 0.005
#: The budget check's own deadline (the accounting process's ledger timeout is inside it).
BUDGET_ASK_TIMEOUT_S = 15.0
#: Base URL of the accounting process's HTTP server (on a Unix socket: the host is a name).
ACCOUNTING_URL = "http://accounting"


class EventChannel:
    """Sends events in batches: appended as they happen, written together ``flush_s`` after
    the first of a batch. A request's tokens are summed within a batch (one event per request
    per batch, placed where its first tokens came, so before its end)."""

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        flush_s: float = FLUSH_S,
        max_backlog_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._writer = writer
        self._flush_s = flush_s
        self.max_backlog_bytes = max_backlog_bytes
        self._events: list[Event] = []
        self._tokens: dict[str, Event] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def send(self, event: Event) -> None:
        self._events.append(event)
        self._arm()

    @property
    def backlog_bytes(self) -> int:
        """Bytes written and not yet taken by the accounting process's socket."""
        transport = self._writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    @property
    def backlogged(self) -> bool:
        """The accounting process is behind by more than ``max_backlog_bytes``."""
        return self.backlog_bytes > self.max_backlog_bytes

    def tokens(self, request_id: str, count: int, t_s: float) -> None:
        pending = self._tokens.get(request_id)
        if pending is not None:
            pending[2] += count
            pending[3] = t_s
            return
        event: Event = [events.TOKENS, request_id, count, t_s]
        self._tokens[request_id] = event
        self._events.append(event)
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and not self.closed:
            self._timer = asyncio.get_running_loop().call_later(self._flush_s, self.flush)

    def flush(self) -> None:
        self._timer = None
        if not self._events or self._writer.is_closing():
            return
        batch, self._events = self._events, []
        self._tokens.clear()
        self._writer.write(events.encode(batch))

    async def drain(self) -> None:
        """Send what is left now, and wait until it is written."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if not self._writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    async def close(self) -> None:
        """Send what is left and close (at the worker's end)."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        self.closed = True
        if not self._writer.is_closing():
            try:
                await self._writer.drain()
            except ConnectionError:
                pass
            self._writer.close()


class RemoteAccountant:
    """The request path's accountant in a worker: it keeps each request's timing (for its
    record and headers) and sends every step to the accounting process, which holds the
    record until it is final.

    Energy figures in an answer (``response.energy_in_usage``): the accounting process sends
    a request that wants them its figures so far at every meter interval (``provisional``
    gives the latest); with tracing on, every request's final record comes back, for its span.
    """

    def __init__(
        self,
        channel: EventChannel,
        estimator: Estimator,
        g_per_j: Callable[[str], float],
        worker: int = 0,
        clock: Callable[[], float] = time.monotonic,
        want_final: bool = False,
    ) -> None:
        self.channel = channel
        self.worker = worker
        self.want_final = want_final
        #: request id -> (energy_j, co2e_g, source) so far, as the accounting process last said
        self.figures: dict[str, tuple[float, float, str]] = {}
        self.estimator = estimator
        self._g_per_j = g_per_j
        self.clock = clock
        #: requests being handled here (their ids: a trusted client id is not taken twice)
        self.requests: dict[str, OpenRequest] = {}

    def begin(
        self,
        record: RequestRecord,
        devices: Iterable[str] | None,
        prompt_tokens_est: int | None,
        stream: bool,
        max_tokens: int | None = None,
        images: int | None = None,
        now: float | None = None,
    ) -> OpenRequest:
        if now is None:
            now = self.clock()
        shape = RequestShape(
            upstream=record.upstream,
            model=record.model,
            task=record.task,
            prompt_tokens=prompt_tokens_est,
            completion_tokens=max_tokens,
            images=images,
        )
        record.extra["worker"] = self.worker  # which worker served it (the record says)
        wanted = None if devices is None else list(devices)
        req = OpenRequest(record, shape, tuple(wanted or ()), now)
        self.requests[record.request_id] = req
        self.channel.send(
            events.begin_event(record, wanted, prompt_tokens_est, stream, max_tokens, images, now)
        )
        if self.want_final:
            self.channel.send([events.WANT, record.request_id, events.WANT_FINAL])
        return req

    def admit(self) -> None:
        """Refuse a new request (503) while the accounting process is behind: before anything
        is read, sent upstream or held for it."""
        if self.channel.backlogged:
            raise Overloaded(
                "the proxy is behind on accounting for its requests; retry shortly "
                "(listen.max_event_backlog_bytes)"
            )

    def want_figures(self, req: OpenRequest) -> None:
        self.channel.send([events.WANT, req.record.request_id, events.WANT_FIGURES])

    def on_figures(self, request_id: str, energy_j: float, co2e_g: float, source: str) -> None:
        if request_id in self.requests:
            self.figures[request_id] = (energy_j, co2e_g, source)

    def first_byte(self, req: OpenRequest, now: float | None = None) -> None:
        if req.t_first_byte_s is None:
            if now is None:
                now = self.clock()
            req.mark_first_byte(now)
            rec = req.record
            self.channel.send([events.FIRST_BYTE, rec.request_id, rec.status, now])

    def tokens(self, req: OpenRequest, count: int, now: float | None = None) -> None:
        if count:
            if now is None:
                now = self.clock()
            req.t_last_token_s = now
            self.channel.tokens(req.record.request_id, count, now)

    def end(
        self,
        req: OpenRequest,
        status: int,
        usage: Usage,
        outcome: str = "ok",
        now: float | None = None,
    ) -> None:
        if req.ended:
            return
        req.ended = True
        if now is None:
            now = self.clock()
        rec = req.record
        self.requests.pop(rec.request_id, None)
        self.figures.pop(rec.request_id, None)
        rec.status = status
        rec.outcome = outcome
        self.channel.send(
            [
                events.END,
                rec.request_id,
                status,
                events.usage_doc(usage),
                outcome,
                rec.extra,
                now,
            ]
        )

    def provisional(self, request_id: str) -> RequestRecord | None:
        """The record with the figures the accounting process last sent (``final`` false);
        None before any came."""
        req = self.requests.get(request_id)
        figures = self.figures.get(request_id)
        if req is None or figures is None:
            return None
        rec = req.provisional_record()
        rec.energy_j, rec.co2e_g, rec.source = figures
        return rec

    def upstream_g_per_j(self, upstream: str) -> float:
        return self._g_per_j(upstream)


class RemoteCounters:
    """Routing decisions and budget rejections, counted in the accounting process's metrics."""

    def __init__(self, channel: EventChannel) -> None:
        self.channel = channel

    def route_decision(self, upstream: str, reason: str) -> None:
        self.channel.send([events.COUNT, "route_decision", [upstream, reason]])

    def budget_rejection(self, scope: str) -> None:
        self.channel.send([events.COUNT, "budget_rejection", [scope]])

    def overload_refusal(self) -> None:
        self.channel.send([events.COUNT, "overload_refusal", []])


class AccountingLink:
    """HTTP to the accounting process over its Unix socket: the endpoints a worker passes on."""

    def __init__(self, http_path: str) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=http_path),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        await self.session.close()

    async def pass_on(self, request: web.Request) -> web.Response:
        """Answer ``request`` with the accounting process's answer to it."""
        headers = filter_headers(request.headers, RESPONSE_DROP)
        body = await request.read() if request.body_exists else None
        async with self.session.request(
            request.method, ACCOUNTING_URL + request.path_qs, headers=headers, data=body
        ) as r:
            data = await r.read()
            out = filter_headers(r.headers, RESPONSE_DROP)
            out.popall("Content-Length", None)
            return web.Response(status=r.status, body=data, headers=out)


class RemoteBudgets:
    """The budget check of a worker: asked of the accounting process (on the event channel,
    answered on the way back), which holds the budgets, their reservations and the ledger's
    figures for every worker."""

    def __init__(self, cfg: BudgetsConfig, channel: EventChannel) -> None:
        self.cfg = cfg
        self.channel = channel
        self._asked: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._next_id = 0

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.users or self.cfg.teams or self.cfg.default)

    def reconfigure(self, cfg: BudgetsConfig) -> None:
        self.cfg = cfg

    async def check(
        self,
        identity: Identity,
        request_id: str | None = None,
        shape: RequestShape | None = None,
    ) -> None:
        ask_id = self._next_id = self._next_id + 1
        answer: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._asked[ask_id] = answer
        shape_doc = None if shape is None else events.shape_doc(shape)
        self.channel.send(
            [events.BUDGET, ask_id, identity.user, identity.team, request_id, shape_doc]
        )
        self.channel.flush()  # a request waits on it: no batching delay
        try:
            async with asyncio.timeout(BUDGET_ASK_TIMEOUT_S):
                refusal = await answer
        except TimeoutError:
            log.warning("budget check unanswered by the accounting process: admitted")
            return  # budgets fail open, as they do when the ledger does not answer
        except asyncio.CancelledError:
            if request_id is not None:  # its client left: a hold made for it has no record
                self.channel.send([events.ABANDON, request_id])
            raise
        finally:
            self._asked.pop(ask_id, None)
        if refusal is not None:
            raise BudgetExceeded(refusal["message"], **refusal["extra"])

    def answered(self, ask_id: int, refusal: dict[str, Any] | None) -> None:
        answer = self._asked.get(ask_id)
        if answer is not None and not answer.done():
            answer.set_result(refusal)
