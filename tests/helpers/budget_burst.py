"""A burst of concurrent requests against a carbon budget, the worst case for admission: the
upstream holds every request it receives until each request of the burst has either reached it
or been refused, so no record can be final while the others are admitted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from estimators.estimator import Estimator, RequestShape
from proxy.config import Config
from proxy.standins import StandIn
from tests.conftest import proxy_config

#: The grid the burst runs on: 360 g/kWh is 1e-4 g per joule.
INTENSITY_G_PER_KWH = 360.0
G_PER_J = INTENSITY_G_PER_KWH / 3.6e6
MAX_TOKENS = 16
CHAT_16: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "one two three"}],
    "max_tokens": MAX_TOKENS,
}
#: Longest a burst may take before the test fails instead of hanging.
BURST_TIMEOUT_S = 60.0


def request_g() -> float:
    """Grams of one burst request, as admission expects them and as its record ends up (no
    metered device: the record is estimated from the same tokens)."""
    shape = RequestShape("llm", "m", "text-generation", completion_tokens=MAX_TOKENS)
    return Estimator().estimate(shape).energy_j * G_PER_J


def budget_config(
    upstream_url: str,
    folder: Path,
    budget_g: float,
    ledger_url: str | None = None,
    extra_upstreams: Sequence[dict[str, Any]] = (),
    **extra: Any,
) -> Config:
    """A proxy with carol's daily budget, header identity, a fixed grid, and an upstream with no
    metered device (records are estimates, equal to what admission expects)."""
    ledger: dict[str, Any] = {
        "url": ledger_url or f"sqlite:///{folder / 'ledger.db'}",
        "flush_interval_ms": 20,
        "spool_path": str(folder / "spool.jsonl"),
    }
    return proxy_config(
        upstream_url,
        folder,
        upstreams=[{"name": "llm", "url": upstream_url, "devices": []}, *extra_upstreams],
        carbon={"intensity_g_per_kwh": INTENSITY_G_PER_KWH},
        identity={"allow_header_identity": True},
        # a loaded test machine must not make admission fail open: the bound is what is tested
        budgets={
            "users": {"carol": {"grams_per_day": budget_g}},
            "cache_s": 0,
            "ledger_timeout_s": 10,
        },
        ledger=ledger,
        **extra,
    )


@dataclass
class Gate:
    """Holds requests at the upstream until ``open`` is set; counts those that arrived."""

    arrived: int = 0
    open: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.arrived += 1
        self.changed.set()
        await self.open.wait()
        return await handler(request)


def gated_app(standin: StandIn, gate: Gate) -> web.Application:
    app = standin.app()
    app.middlewares.append(gate.middleware)
    return app


async def burst(
    bases: list[str],
    n: int,
    gate: Gate,
    user: str = "carol",
    before_open: Callable[[], Awaitable[None]] | None = None,
) -> list[int]:
    """``n`` chat requests at once, spread over ``bases`` (replicas); the gate opens once every
    one of them has reached the upstream or been answered (``before_open`` runs then).
    Returns the statuses."""
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            async with session.post(
                f"{bases[i % len(bases)]}/v1/chat/completions",
                json=CHAT_16,
                headers={"X-Wattproxy-User": user},
            ) as r:
                await r.read()
                statuses.append(r.status)
                gate.changed.set()

        async with asyncio.timeout(BURST_TIMEOUT_S):
            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            while gate.arrived + len(statuses) < n:
                await gate.changed.wait()
                gate.changed.clear()
            if before_open is not None:
                await before_open()
            gate.open.set()
            await asyncio.gather(*tasks)
    return statuses
