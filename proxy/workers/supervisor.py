"""The accounting process of ``wattproxy serve --workers N``: it owns the meter, the attribution
engine, the ledger writer, the budgets and the metrics, reads the workers' events (``Hub``),
answers their budget checks and the endpoints they pass on over a Unix socket, and keeps N
worker processes serving.

- The port: the accounting process binds it first with ``SO_REUSEPORT`` and never listens on
  it (a socket that does not listen receives no connection), so ``listen.port: 0`` resolves
  once, the workers bind the same port beside it, and a restarted worker finds it free.
- A worker that exits unasked is started again (after a pause that grows while it keeps
  failing); its requests in flight are closed as ``proxy_restart`` by the hub.
- SIGHUP: the accounting process reloads its own config (budgets, keys for the emission
  endpoints...) and sends SIGHUP to every worker, which reloads the same file.
- SIGTERM: every worker stops accepting and finishes its requests (``shutdown_grace_s``); then
  the accounting process reads the meter once more, finalizes and flushes the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.app import PARTS, Parts, add_accounting_routes, build_parts, lifecycle
from proxy.config import Config
from proxy.errors import WorkerError
from proxy.middleware import error_middleware
from proxy.protocol import ProxyRunner, handler_args
from proxy.reload import reload_file
from proxy.server import start_metrics_listener
from proxy.workers.hub import MAX_LINE_BYTES, Hub, LaggedReadings

log = logging.getLogger("wattproxy.workers")

#: Seconds every worker has to start serving at startup.
STARTUP_TIMEOUT_S = 60.0
#: Pause before a worker that exited is started again, doubled while it keeps failing fast.
RESTART_PAUSE_S = 0.5
MAX_RESTART_PAUSE_S = 10.0
#: A worker that served this long before exiting is restarted after the shortest pause.
HEALTHY_AFTER_S = 10.0
#: Seconds past ``shutdown_grace_s`` a stopping worker gets before it is killed.
STOP_MARGIN_S = 10.0
ROOT = Path(__file__).resolve().parent.parent.parent


def resolve_workers(workers: int | str) -> int:
    """``listen.workers``: a count, or ``auto`` for the cores this process may run on."""
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return int(workers)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening: it holds the port
    for the workers (and resolves port 0) without taking any connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def accounting_app(cfg: Config, parts: Parts) -> web.Application:
    """The accounting process's HTTP app (on its Unix socket): what workers pass on."""
    app = web.Application(
        handler_args=handler_args(cfg),
        middlewares=[error_middleware(lambda: parts.runtime.cfg.identity.trust_request_id)],
    )
    app[PARTS] = parts
    add_accounting_routes(app, cfg, parts)
    app.cleanup_ctx.append(lifecycle)
    return app


@dataclass
class Slot:
    """One worker's place: its process now, and how often it was restarted."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    pid: int | None = None
    restarts: int = 0
    #: it said it serves (its signal handlers are set: SIGHUP reloads instead of killing it)
    serving: bool = False
    #: a reload came while it was starting: it is sent SIGHUP once it serves
    reload_pending: bool = False


class Supervisor:
    """The accounting process and its workers, started, reloaded and stopped together (the
    same interface as ``proxy.server.Service``).

    Args:
        cfg: the config it starts with.
        config_path: the file SIGHUP reads again (and the workers load); None: the config is
            written to a private file for the workers, and nothing reloads.
        workers: how many worker processes.
        parts_kwargs: passed to ``build_parts`` (tests: meter, ledger, registry).
    """

    def __init__(
        self, cfg: Config, config_path: str | None, workers: int, **parts_kwargs: Any
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.count = workers
        self.parts = build_parts(cfg, **parts_kwargs)
        self.app = accounting_app(cfg, self.parts)
        self.hub = Hub(
            self.parts.accountant,
            self.parts.metrics,
            on_hello=self._hello,
            budgets=self.parts.budgets,
        )
        if cfg.tracing.enabled:  # the workers' spans end with their final records
            self.parts.final_hooks.append(self.hub.final)
        # readings wait for the workers' events of their interval (``READING_LAG_S`` or more)
        self.readings = LaggedReadings(
            self.parts.accountant.on_reading, self.hub.lateness.reading_lag_s
        )
        self.parts.sampler.on_reading = self.readings
        self.slots = [Slot(i) for i in range(workers)]
        self.stopping = False
        self._dir = Path(tempfile.mkdtemp(prefix="wattproxy-"))
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._ipc: asyncio.Server | None = None
        self._reserved: socket.socket | None = None
        self._keepers: list[asyncio.Task[None]] = []
        self._figures: asyncio.Task[None] | None = None
        self._serving: dict[int, asyncio.Event] = {}
        self._startup_failed = asyncio.Event()
        self._startup_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._log_level = cfg.log.level

    @property
    def http_path(self) -> str:
        return str(self._dir / "accounting.sock")

    @property
    def ipc_path(self) -> str:
        return str(self._dir / "events.sock")

    @property
    def port(self) -> int:
        assert self._reserved is not None, "not started"
        return int(self._reserved.getsockname()[1])

    @property
    def metrics_port(self) -> int | None:
        if self._metrics_runner is None:
            return None
        return int(self._metrics_runner.addresses[0][1])

    async def start(self) -> None:
        cfg = self.cfg
        self._reserved = reserve_port(cfg.listen.host, cfg.listen.port)
        self._ipc = await asyncio.start_unix_server(
            self.hub.serve, self.ipc_path, limit=MAX_LINE_BYTES
        )
        runner = ProxyRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        await web.UnixSite(runner, self.http_path).start()
        if cfg.listen.metrics_port is not None:
            self._metrics_runner = await start_metrics_listener(cfg, self.parts.metrics)
        self._worker_config = self._config_file()
        self._figures = asyncio.get_running_loop().create_task(
            self.hub.send_figures(cfg.meter.interval_ms / 1000.0), name="wattproxy:figures"
        )
        for slot in self.slots:
            self._serving[slot.index] = asyncio.Event()
            self._keepers.append(
                asyncio.get_running_loop().create_task(
                    self._keep(slot), name=f"wattproxy:worker-{slot.index}"
                )
            )
        loop = asyncio.get_running_loop()
        serving = loop.create_task(self._all_serving())
        failed = loop.create_task(self._startup_failed.wait())
        done, _ = await asyncio.wait(
            {serving, failed}, timeout=STARTUP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (serving, failed):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if serving not in done:
            why = self._startup_error or (
                f"the workers did not start serving within {STARTUP_TIMEOUT_S:g} s"
            )
            raise WorkerError(f"{why} (see the log above)")
        gc.freeze()  # what startup built lives as long as the process: the collector skips it
        log.info(
            "wattproxy listening on %s:%s%s with %d workers (accounting process %d)",
            cfg.listen.host,
            self.port,
            " (TLS)" if cfg.listen.tls is not None else "",
            self.count,
            os.getpid(),
        )

    async def _all_serving(self) -> None:
        for event in self._serving.values():
            await event.wait()

    def _config_file(self) -> str:
        if self.config_path is not None:
            return self.config_path
        path = self._dir / "config.json"
        path.write_text(json.dumps(self.cfg.model_dump(mode="json")))
        return str(path)

    def _hello(self, pid: int, index: int) -> None:
        event = self._serving.get(index)
        if event is not None:
            event.set()
        slot = self.slots[index] if 0 <= index < len(self.slots) else None
        if slot is None or slot.pid != pid:
            return
        slot.serving = True
        if slot.reload_pending and slot.proc is not None:
            slot.reload_pending = False
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGHUP)

    async def _spawn(self, slot: Slot) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [
            sys.executable,
            "-m",
            "proxy.workers.worker",
            "--config",
            self._worker_config,
            "--ipc",
            self.ipc_path,
            "--http",
            self.http_path,
            "--port",
            str(self.port),
            "--index",
            str(slot.index),
        ]
        if self.config_path is not None:
            cmd += ["--reload-path", self.config_path]
        return await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL)

    async def _keep(self, slot: Slot) -> None:
        """Run the slot's worker; start it again when it exits unasked."""
        loop = asyncio.get_running_loop()
        pause_s = RESTART_PAUSE_S
        while not self.stopping:
            started_s = loop.time()
            slot.serving = slot.reload_pending = False
            proc = slot.proc = await self._spawn(slot)
            slot.pid = proc.pid
            rc = await proc.wait()
            if self.stopping:
                return
            if not self._serving[slot.index].is_set():  # never served: starting again won't help
                self._startup_error = f"worker {slot.index} exited with {rc} before serving"
                self._startup_failed.set()
                return
            slot.restarts += 1
            self.parts.metrics.worker_restarts.inc()
            if loop.time() - started_s >= HEALTHY_AFTER_S:
                pause_s = RESTART_PAUSE_S
            log.error(
                "worker %d (pid %d) exited with %s; starting it again in %.1f s",
                slot.index,
                proc.pid,
                rc if rc >= 0 else signal.Signals(-rc).name,
                pause_s,
            )
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, MAX_RESTART_PAUSE_S)

    def worker_pids(self) -> list[int]:
        return [s.pid for s in self.slots if s.pid is not None]

    def _signal_workers(self, sig: signal.Signals) -> None:
        """Signal every worker; SIGHUP waits for a starting one to serve (before its handler
        is set, SIGHUP's default action would end it)."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                if sig == signal.SIGHUP and not slot.serving:
                    slot.reload_pending = True
                    continue
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    async def reload(self) -> bool:
        """Reload the accounting process's config, then every worker's (SIGHUP each)."""
        async with self._reload_lock:
            new = await reload_file(self.config_path, self.parts)
            if new is None:
                return False
            if new.log.level != self._log_level:
                logging.getLogger().setLevel(new.log.level.upper())
                self._log_level = new.log.level
            self._signal_workers(signal.SIGHUP)
            return True

    async def stop(self) -> None:
        """Workers finish their requests (up to ``listen.shutdown_grace_s``) and exit; then the
        accounting process finalizes and flushes what they sent."""
        grace_s = self.cfg.listen.shutdown_grace_s
        log.info("shutting down: %d workers finish their requests (up to %ss)", self.count, grace_s)
        self.stopping = True
        self._signal_workers(signal.SIGTERM)
        procs = [s.proc for s in self.slots if s.proc is not None]
        try:
            async with asyncio.timeout(grace_s + STOP_MARGIN_S):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            log.error("workers still running %g s after SIGTERM: killed", grace_s + STOP_MARGIN_S)
            self._signal_workers(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        for task in self._keepers:
            task.cancel()
        if self._figures is not None:
            self._figures.cancel()
        await self.hub.wait_closed()  # every worker's last events applied
        self.readings.immediate = True  # nothing more to wait for
        self.readings.flush()
        if self._ipc is not None:
            self._ipc.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._runner is not None:
            await self._runner.cleanup()  # lifecycle: read the meter, finalize, flush the ledger
            self._runner = None
        if self._reserved is not None:
            self._reserved.close()
        shutil.rmtree(self._dir, ignore_errors=True)
