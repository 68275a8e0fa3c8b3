"""Runs the proxy: listeners (main, optional /metrics and TLS), uvloop when available, graceful
shutdown on SIGTERM/SIGINT, config reload on SIGHUP.

SIGTERM/SIGINT: stop accepting, let requests in flight (streams included) finish for up to
``listen.shutdown_grace_s``, then cancel what is left, read the meter once more and flush the
ledger (replaying the spool when the backend is back). SIGHUP: read the config file again and
apply what can change live (``reload.apply_config``); an invalid file is logged and the running
config kept. Listeners are never closed by a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import ssl
from typing import Any

from aiohttp import web

from proxy.app import PARTS, create_app
from proxy.config import Config
from proxy.metrics import Metrics, metrics_handler
from proxy.protocol import ProxyRunner, handler_args
from proxy.reload import reload_file

log = logging.getLogger("wattproxy")

#: Below this open-file limit, the proxy warns at startup (two descriptors per stream).
MIN_FDS = 16_384


def ssl_context(cfg: Config) -> ssl.SSLContext | None:
    tls = cfg.listen.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def _port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


async def start_metrics_listener(cfg: Config, metrics: Metrics) -> web.AppRunner:
    """``/metrics`` on its own listener (``listen.metrics_port``)."""
    mapp = web.Application(handler_args=handler_args(cfg))

    async def handler(request: web.Request) -> web.Response:
        return await metrics_handler(request, metrics)

    mapp.router.add_get("/metrics", handler)
    runner = ProxyRunner(mapp, access_log=None, handle_signals=False)
    await runner.setup()
    host = cfg.listen.metrics_host or cfg.listen.host
    await web.TCPSite(runner, host, cfg.listen.metrics_port).start()
    return runner


class Service:
    """The listeners of one proxy process, started, reloaded and stopped together.

    Args:
        cfg: the config it starts with.
        config_path: the file SIGHUP reads again (None: nothing to reload).
        parts_kwargs: passed to ``create_app`` (tests: meter, ledger, registry).
    """

    def __init__(self, cfg: Config, config_path: str | None = None, **parts_kwargs: Any) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.app = create_app(cfg, **parts_kwargs)
        self._log_level = cfg.log.level
        self._reload_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None

    async def start(self) -> None:
        cfg = self.cfg
        # handler_cancellation=True is deliberate (aiohttp's default is False): when a client
        # goes away, its handler is cancelled, which closes the upstream request, so the
        # upstream stops generating what nobody will read and the GPU work (and energy) ends
        # with it; the handler's ``finally`` still records the request (``client_disconnect``).
        # aiohttp's test server cancels handlers the same way, so tests see what production does.
        runner = ProxyRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=cfg.listen.shutdown_grace_s,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port, ssl_context=ssl_context(cfg))
        await site.start()
        if cfg.listen.metrics_port is not None:
            self._metrics_runner = await start_metrics_listener(cfg, self.app[PARTS].metrics)
        log.info(
            "wattproxy listening on %s:%s%s",
            cfg.listen.host,
            self.port,
            " (TLS)" if cfg.listen.tls is not None else "",
        )

    @property
    def port(self) -> int:
        """The main listener's port (the one bound when ``listen.port`` is 0)."""
        assert self._runner is not None, "not started"
        return _port(self._runner)

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_runner is None else _port(self._metrics_runner)

    async def reload(self) -> bool:
        """Read the config file again and apply it; False (old config kept) when it is
        invalid or there is no file."""
        async with self._reload_lock:
            new = await reload_file(self.config_path, self.app[PARTS])
            if new is None:
                return False
            if new.log.level != self._log_level:
                logging.getLogger().setLevel(new.log.level.upper())
                self._log_level = new.log.level
            return True

    async def stop(self) -> None:
        """Stop accepting, finish requests in flight (up to ``listen.shutdown_grace_s``),
        then flush the ledger (the app's cleanup)."""
        log.info(
            "shutting down: finishing in-flight requests (up to %ss)",
            self.cfg.listen.shutdown_grace_s,
        )
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None


async def run(
    cfg: Config, config_path: str | None = None, ready: asyncio.Event | None = None
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads ``config_path`` (the file ``cfg`` came
    from, as the CLI resolved it). With ``listen.workers`` above 1 this process is the
    accounting process of that many workers (``proxy.workers``)."""
    from proxy.workers.supervisor import Supervisor, resolve_workers

    workers = resolve_workers(cfg.listen.workers)
    service: Service | Supervisor = (
        Supervisor(cfg, config_path, workers) if workers > 1 else Service(cfg, config_path)
    )
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        task: asyncio.Task[bool] = loop.create_task(service.reload(), name="wattproxy:reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # before starting: a signal while workers start must not take the default action (exit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await service.start()
    except BaseException:
        await service.stop()
        raise
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for task in reloads:
            task.cancel()
        await service.stop()


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one: every stream holds two sockets (client and
    upstream), and running out makes accept() fail in a busy loop. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d: %s", soft, e)
    if soft < MIN_FDS:
        log.warning(
            "open-file limit is %d: about %d concurrent streams; raise it (ulimit -n, "
            "systemd LimitNOFILE=65536)",
            soft,
            soft // 2,
        )
    return int(soft)


def serve(cfg: Config, config_path: str | None = None) -> int:
    raise_fd_limit()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(run(cfg, config_path))
    else:
        uvloop.run(run(cfg, config_path))
    return 0
