"""``/healthz`` (the process answers) and ``/readyz`` (it can do its job: the upstreams accept
connections as ``health.ready_when`` asks, and the ledger answers). Each probe is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from estimators.meters import Meter, Sampler
from proxy.ledger.base import Ledger
from proxy.ledger.writer import LedgerWriter
from proxy.runtime import Live

#: Seconds a /readyz upstream probe may take.
READY_PROBE_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def probe(url: str, timeout_s: float = READY_PROBE_TIMEOUT_S) -> bool:
    """Whether the upstream at ``url`` accepts a TCP connection within ``timeout_s``."""
    parsed = aiohttp.client.URL(url)
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(parsed.host, parsed.port)
            writer.close()
        return True
    except (OSError, TimeoutError):
        return False


def readyz_handler(
    live: Live, ledger: Ledger, writer: LedgerWriter, meter: Meter, sampler: Sampler
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``/readyz``: the upstreams of the runtime in force, the ledger and the meter."""

    async def readyz(request: web.Request) -> web.Response:
        cfg = live.runtime.cfg
        upstreams = dict(
            zip(
                [u.name for u in cfg.upstreams],
                await asyncio.gather(*(probe(u.url) for u in cfg.upstreams)),
                strict=True,
            )
        )
        try:
            ledger_ok = await ledger.ping()
        except Exception:
            ledger_ok = False
        devices = meter.devices()
        meter_ok = not devices or sampler.reads > 0
        ready_when = cfg.health.ready_when
        answering = any if ready_when == "any" else all
        ready = answering(upstreams.values()) and ledger_ok
        body = {
            "ready": ready,
            "ready_when": ready_when,
            "upstreams": upstreams,
            "ledger": {"backend": ledger.backend, "ok": ledger_ok, "backlog": writer.backlog},
            "meter": {"kind": meter.kind, "devices": devices, "ok": meter_ok},
        }
        return web.json_response(body, status=200 if ready else 503)

    return readyz
