"""A worker process: accepts on the proxy's port beside the other workers (``SO_REUSEPORT``),
identifies, routes, relays and parses as a single process does, and sends every request's
events to the accounting process (``proxy.workers.remote``). ``/metrics``, ``/readyz`` and the
emission endpoints are passed on to the accounting process, which holds what they report.

Started by the accounting process (``proxy.workers.supervisor``), never by hand:

    python -m proxy.workers.worker --config F --ipc SOCK --http SOCK --port N --index I

SIGTERM/SIGINT: stop accepting, finish the requests in flight (``listen.shutdown_grace_s``),
send their ends, exit. SIGHUP: reload the config file (as a single process does). The
accounting process gone (its socket closed): the worker stops the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from estimators.carbon import CarbonClock, CarbonConfig, build_provider
from proxy.app import build_estimator
from proxy.background import Background
from proxy.config import Config, load_config
from proxy.errors import WattproxyError
from proxy.forward import Forwarder
from proxy.health import healthz
from proxy.middleware import error_middleware
from proxy.protocol import ProxyRunner, handler_args
from proxy.records import RequestRecord
from proxy.reload import reload_file
from proxy.route_policy import RouteState, UpstreamGrids
from proxy.runtime import Live, Runtime, build_runtime, load_counters, load_keys, model_tasks_of
from proxy.server import raise_fd_limit, ssl_context
from proxy.sessions import Sessions
from proxy.tokens import TokenCounter
from proxy.tracing import NullTracing, build_tracing
from proxy.workers import events
from proxy.workers.hub import MAX_LINE_BYTES
from proxy.workers.remote import (
    AccountingLink,
    EventChannel,
    RemoteAccountant,
    RemoteBudgets,
    RemoteCounters,
)

log = logging.getLogger("wattproxy.worker")

#: Seconds a stopping worker waits for the final records of its open spans.
FINALS_WAIT_S = 5.0

#: The accounting process's endpoints a worker passes on (``/metrics`` too, when it is on the
#: main listener).
PASSED_ON = (
    "/readyz",
    "/v1/emissions/requests/{request_id}",
    "/v1/emissions/users/{user}",
    "/v1/emissions/summary",
)


@dataclass
class WorkerParts:
    """What one worker runs; a reload replaces ``live.runtime`` (``proxy.reload``)."""

    live: Live
    environ: Mapping[str, str]
    channel: EventChannel
    link: AccountingLink
    accountant: RemoteAccountant
    budgets: RemoteBudgets
    routes: RouteState
    tracing: NullTracing
    sessions: Sessions = field(default_factory=Sessions)
    background: Background = field(default_factory=Background)

    @property
    def runtime(self) -> Runtime:
        return self.live.runtime


def _clock(carbon: CarbonConfig, environ: Mapping[str, str]) -> CarbonClock:
    """A carbon clock of the worker's own (routing, deferral, the grams of an estimate in an
    answer); the intensity gauges are the accounting process's."""
    provider = build_provider(carbon, environ=environ)
    return CarbonClock(provider, carbon.zone, carbon.pue, carbon.refresh_s)


def build_worker_parts(
    cfg: Config,
    channel: EventChannel,
    link: AccountingLink,
    environ: Mapping[str, str],
    index: int = 0,
) -> WorkerParts:
    base = _clock(cfg.carbon, environ)
    routes = RouteState(base, cfg.carbon, lambda c: _clock(c, environ))
    routes.ensure_clocks(cfg.upstreams)
    budgets = RemoteBudgets(cfg.budgets, channel)
    counters = {u.name: TokenCounter(u.model_path) for u in cfg.upstreams if u.model_path}
    tasks = model_tasks_of(cfg)
    live = Live(build_runtime(cfg, load_keys(cfg), environ, budgets, {}, counters, tasks))
    grids = UpstreamGrids(routes, lambda: live.runtime.cfg.upstreams)

    def g_per_j(upstream: str) -> float:
        own = grids.upstream_g_per_j(upstream)
        return base.g_per_j() if own is None else own

    tracing = build_tracing(cfg.tracing)  # spans open here, end with the final record sent back
    accountant = RemoteAccountant(
        channel, build_estimator(cfg), g_per_j, worker=index, want_final=tracing.enabled
    )
    return WorkerParts(live, environ, channel, link, accountant, budgets, routes, tracing)


def worker_app(cfg: Config, parts: WorkerParts) -> web.Application:
    live = parts.live
    app = web.Application(
        client_max_size=cfg.limits.max_body_bytes,
        handler_args=handler_args(cfg),
        middlewares=[error_middleware(lambda: live.runtime.cfg.identity.trust_request_id)],
    )
    forwarder = Forwarder(
        live,
        parts.sessions,
        parts.accountant,
        RemoteCounters(parts.channel),
        tracing=parts.tracing,
        routes=parts.routes,
    )
    if cfg.listen.metrics_port is None:
        app.router.add_get("/metrics", parts.link.pass_on)
    app.router.add_get("/healthz", healthz)
    for path in PASSED_ON:
        app.router.add_get(path, parts.link.pass_on)
    app.router.add_route("*", "/{tail:.*}", forwarder.handle)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        rt = parts.runtime
        sessions = {u.name: parts.sessions.open(u) for u in rt.cfg.upstreams}
        counters = await load_counters(rt.counters)
        live.runtime = dataclasses.replace(rt, sessions=sessions, counters=counters)
        for clock in parts.routes.clocks():
            parts.background.spawn(f"carbon-intensity-{clock.zone}", clock.run())
        yield
        await parts.background.cancel_all()
        for clock in parts.routes.clocks():
            await clock.provider.close()
        await parts.sessions.close_all()

    app.cleanup_ctx.append(lifecycle)
    return app


async def run_worker(
    cfg: Config, config_path: str | None, ipc_path: str, http_path: str, port: int, index: int
) -> None:
    """Serve until SIGTERM/SIGINT or until the accounting process is gone."""
    reader, writer = await asyncio.open_unix_connection(ipc_path, limit=MAX_LINE_BYTES)
    channel = EventChannel(writer, max_backlog_bytes=cfg.listen.max_event_backlog_bytes)
    link = AccountingLink(http_path)
    parts = build_worker_parts(cfg, channel, link, os.environ, index)
    runner = ProxyRunner(
        worker_app(cfg, parts),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,  # as a single process: see proxy.server.Service.start
        shutdown_timeout=cfg.listen.shutdown_grace_s,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()
    level = cfg.log.level

    async def reload() -> None:
        nonlocal level
        new = await reload_file(config_path, parts)
        if new is not None and new.log.level != level:
            logging.getLogger().setLevel(new.log.level.upper())
            level = new.log.level

    def on_hup() -> None:
        task = loop.create_task(reload(), name="wattproxy:reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)  # before serving: never the default (exit)
    parent: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        site = web.TCPSite(
            runner, cfg.listen.host, port, ssl_context=ssl_context(cfg), reuse_port=True
        )
        await site.start()
        gc.freeze()  # what startup built lives as long as the process: the collector skips it
        channel.send([events.HELLO, os.getpid(), index])
        channel.flush()
        parent = loop.create_task(
            listen_back(reader, parts)
        )  # ends: the accounting process is gone
        parent.add_done_callback(lambda _: stop.set())
        await stop.wait()
    finally:
        for task in reloads:
            task.cancel()
        await runner.cleanup()  # in-flight requests finish (up to the grace), then lifecycle
        await channel.drain()  # their ends go out last
        deadline = loop.time() + FINALS_WAIT_S
        while (
            parts.tracing.open_spans
            and parent is not None
            and not parent.done()
            and loop.time() < deadline
        ):
            await asyncio.sleep(0.05)  # the final records of their spans come back
        await channel.close()
        await link.close()
        if parent is not None:
            parent.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await parent
        await asyncio.to_thread(parts.tracing.close)  # export the last spans


async def listen_back(reader: asyncio.StreamReader, parts: WorkerParts) -> None:
    """What the accounting process sends back: figures so far, final records (for spans)."""
    while True:
        try:
            line = await reader.readline()
        except (ValueError, ConnectionError) as e:
            log.error("the accounting process's stream broke (%s)", e)
            return
        if not line:
            return
        for event in events.decode(line):
            if event[0] == events.FIGURES:
                parts.accountant.on_figures(event[1], event[2], event[3], event[4])
            elif event[0] == events.ANSWER:
                parts.budgets.answered(event[1], event[2])
            elif event[0] == events.FINAL:
                parts.tracing.finish(RequestRecord.from_dict(event[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wattproxy-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--reload-path", default=None)
    p.add_argument("--ipc", required=True)
    p.add_argument("--http", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--index", type=int, default=0)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    logging.basicConfig(
        level=cfg.log.level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s",
        stream=sys.stderr,
    )
    raise_fd_limit()
    coro = run_worker(cfg, args.reload_path, args.ipc, args.http, args.port, args.index)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is optional
            asyncio.run(coro)
        else:
            uvloop.run(coro)
    except (OSError, WattproxyError) as e:  # the accounting process says which worker failed
        log.error("worker %d cannot serve: %s", args.index, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
