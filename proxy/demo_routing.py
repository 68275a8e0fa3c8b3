"""``wattproxy demo --scenario carbon-routing``: carbon-aware routing on one machine.

Two stand-in servers serve the same model, one in zone FR and one in zone PL; a stand-in of
Electricity Maps' API gives each zone's live intensity. With ``routing.policy: least_carbon``
the traffic goes to the cleaner grid; half way the two grids swap their figures, the proxy's
clocks pick the change up, and the traffic moves.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import PARTS, create_app
from proxy.config import parse_config
from proxy.demo import free_port
from proxy.standins import StandIn

#: the two upstreams and their zones
ZONES = {"paris": "FR", "warsaw": "PL"}
#: g/kWh per zone, before and after the swap
PHASES = [{"FR": 45.0, "PL": 690.0}, {"FR": 610.0, "PL": 80.0}]
REFRESH_S = 0.2


class Grid:
    """A stand-in of Electricity Maps' ``/v3/carbon-intensity/latest`` with figures the demo
    changes."""

    def __init__(self) -> None:
        self.g_per_kwh: dict[str, float] = dict(PHASES[0])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v3/carbon-intensity/latest", self.latest)
        return app

    async def latest(self, request: web.Request) -> web.Response:
        zone = request.query.get("zone", "")
        if zone not in self.g_per_kwh:
            return web.json_response({"error": f"unknown zone {zone}"}, status=404)
        return web.json_response(
            {"zone": zone, "carbonIntensity": self.g_per_kwh[zone], "isEstimated": False}
        )


def routing_config(
    upstreams: dict[str, str], grid_url: str, out: Path, port: int
) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstreams": [
            {"name": name, "url": url, "models": ["llama-*"], "carbon": {"zone": ZONES[name]}}
            for name, url in upstreams.items()
        ],
        "meter": {"kind": "simulated", "interval_ms": 50},
        "carbon": {
            "zone": "FR",
            "provider": "electricitymaps",
            "url": grid_url,
            "refresh_s": REFRESH_S,
            "pue": 1.2,
        },
        "routing": {"policy": "least_carbon"},
        "ledger": {"url": f"sqlite:///{out / 'wattproxy.db'}", "flush_interval_ms": 100},
    }


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def _counted(app: web.Application, name: str, answered: list[str]) -> web.Application:
    """``app``, noting ``name`` in ``answered`` for every request it answers."""

    @web.middleware
    async def note(request: web.Request, handler: Any) -> web.StreamResponse:
        answered.append(name)
        return await handler(request)

    app.middlewares.append(note)
    return app


async def _phase(base: str, requests: int, answered: list[str]) -> Counter[tuple[str, str]]:
    """Send ``requests`` chats, one at a time; where each went and why."""
    went: Counter[tuple[str, str]] = Counter()
    async with aiohttp.ClientSession() as s:
        for i in range(requests):
            body = {
                "model": "llama-3-8b",
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 8,
            }
            async with s.post(base + "/v1/chat/completions", json=body) as r:
                await r.read()
                upstream = answered.pop() if answered else "?"
                went[(upstream, r.headers.get("X-Wattproxy-Route-Reason", "-"))] += 1
    return went


async def run_routing_demo(out: Path, requests: int = 40) -> int:
    """Print where the traffic went before and after the grids swap; 0 when it followed the
    cleaner grid both times."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("wattproxy.db", "wattproxy.db-wal", "wattproxy.db-shm"):
        (out / name).unlink(missing_ok=True)
    grid = Grid()
    runners = []
    urls = {}
    answered: list[str] = []
    try:
        for name in ZONES:
            standin = StandIn(scale=0.0, keep_requests=False).app()
            runner, urls[name] = await _serve(_counted(standin, name, answered))
            runners.append(runner)
        grid_runner, grid_url = await _serve(grid.app())
        runners.append(grid_runner)
        port = free_port()
        cfg = parse_config(routing_config(urls, grid_url, out, port), "demo", environ={})
        environ = {"ELECTRICITYMAPS_TOKEN": "demo"}  # the stand-in grid takes any token
        app = create_app(cfg, registry=CollectorRegistry(), environ=environ)
        parts = app[PARTS]
        proxy_runner = web.AppRunner(app, access_log=None)
        await proxy_runner.setup()
        runners.append(proxy_runner)
        await web.TCPSite(proxy_runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        print(
            "wattproxy demo (carbon-routing): upstreams "
            + ", ".join(f"{n} in {z}" for n, z in ZONES.items())
            + f" serve the same model; routing.policy least_carbon; {requests} requests"
        )
        ok = True
        for number, figures in enumerate(PHASES, 1):
            grid.g_per_kwh = dict(figures)
            routes = parts.routes
            assert routes is not None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until both clocks have the new figures
                now = {
                    routes.clock(u).intensity.zone: routes.clock(u).intensity.g_per_kwh
                    for u in parts.runtime.cfg.upstreams
                }
                if now == figures:
                    break
                await asyncio.sleep(REFRESH_S / 2)
            went = await _phase(base, requests // len(PHASES), answered)
            cleaner = min(ZONES, key=lambda n: figures[ZONES[n]])
            grids = ", ".join(f"{z} {g:g} g/kWh" for z, g in figures.items())
            print(f"\nphase {number}: {grids}")
            for (upstream, reason), n in sorted(went.items()):
                print(f"  {n:4d} requests -> {upstream:8s} ({reason})")
            ok = ok and set(went) == {(cleaner, "least_carbon")}
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    print("\ntraffic followed the cleaner grid" if ok else "\ntraffic did NOT follow the grid")
    return 0 if ok else 1
