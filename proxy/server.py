"""Runs the proxy: listeners (main, optional /metrics and TLS), uvloop when available, graceful
shutdown on SIGTERM/SIGINT, config reload on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl

from aiohttp import web

from proxy.app import PARTS, create_app
from proxy.config import Config
from proxy.metrics import metrics_handler

log = logging.getLogger("wattproxy")


def _ssl_context(cfg: Config) -> ssl.SSLContext | None:
    tls = cfg.listen.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


async def run(
    cfg: Config, config_path: str | None = None, ready: asyncio.Event | None = None
) -> None:
    """Serve until SIGTERM or SIGINT."""
    app = create_app(cfg)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=cfg.listen.shutdown_grace_s
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port, ssl_context=_ssl_context(cfg))
    await site.start()
    metrics_runner: web.AppRunner | None = None
    if cfg.listen.metrics_port is not None:
        parts = app[PARTS]
        mapp = web.Application()

        async def metrics(request: web.Request) -> web.Response:
            return await metrics_handler(request, parts.metrics)

        mapp.router.add_get("/metrics", metrics)
        metrics_runner = web.AppRunner(mapp, access_log=None, handle_signals=False)
        await metrics_runner.setup()
        await web.TCPSite(
            metrics_runner, cfg.listen.metrics_host or cfg.listen.host, cfg.listen.metrics_port
        ).start()
    log.info("wattproxy listening on %s:%s", cfg.listen.host, cfg.listen.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info(
            "shutting down: finishing in-flight requests (up to %ss)", cfg.listen.shutdown_grace_s
        )
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()


def serve(cfg: Config, config_path: str | None = None) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(run(cfg, config_path))
    else:
        uvloop.run(run(cfg, config_path))
    return 0
