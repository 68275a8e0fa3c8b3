"""Measured energy end to end: concurrent streams through a real `wattproxy serve` process that
meters a dcgm-exporter page, checked against the page's own ground truth."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.standins import StandIn
from tests.fakes.dcgm_exporter import ExporterGpu, FakeExporter
from tests.helpers.serve import wattproxy_serve

POWER_W = 250.0


class RunningExporter(FakeExporter):
    """A dcgm-exporter whose GPU draws a constant 250 W: its energy counter (mJ since boot)
    grows with wall time. Every value it served is kept, as ground truth."""

    def __init__(self) -> None:
        super().__init__([ExporterGpu(0, "GPU-15704b32-f531-14ce-0530-1ac21e4b68e6", "0:53:00.0")])
        self.t0 = time.monotonic()
        self.base_mj = 319_159_391
        self.served_mj: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        gpu = self.gpus[0]
        gpu.energy_mj = self.base_mj + int(POWER_W * 1000 * (time.monotonic() - self.t0))
        gpu.power_w = POWER_W
        self.served_mj.append(gpu.energy_mj)
        return await super().handle(request)


def sample(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.timeout(60)
async def test_dcgm_metered_streams_match_the_exporter(aiohttp_server: Any, tmp_path: Path) -> None:
    exporter = RunningExporter()
    exp_app = web.Application()
    exp_app.router.add_get("/metrics", exporter.handle)
    exp = await aiohttp_server(exp_app)
    standin = StandIn(flavor="vllm", scale=1.0, keep_requests=False)
    up = await aiohttp_server(standin.app())
    cfg = {
        "upstreams": [{"name": "llm", "url": f"http://127.0.0.1:{up.port}", "devices": ["gpu0"]}],
        "meter": {
            "kind": "dcgm",
            "interval_ms": 50,
            "dcgm_url": f"http://127.0.0.1:{exp.port}/metrics",
            "devices": {"gpu0": {"index": 0}},
        },
        "attribution": {"idle_watts": 100},
        "ledger": {"url": f"sqlite:///{tmp_path / 'l.db'}"},
    }
    async with wattproxy_serve(cfg, tmp_path) as served, aiohttp.ClientSession() as s:
        base = served.base

        async def stream(i: int) -> str:
            body = {
                "model": "llama",
                "messages": [{"role": "user", "content": "word " * (5 + 20 * (i % 3))}],
                "max_tokens": 10 + 5 * (i % 4),
                "stream": True,
            }
            async with s.post(base + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
                return r.headers["X-Request-Id"]

        rids = await asyncio.gather(*(stream(i) for i in range(24)))
        records = []
        for rid in rids:
            for _ in range(100):
                async with s.get(f"{base}/v1/emissions/requests/{rid}") as r:
                    doc = await r.json()
                if doc.get("final"):
                    break
                await asyncio.sleep(0.05)
            records.append(doc)
        async with s.get(base + "/metrics") as r:
            text = await r.text()

    assert all(r["final"] and r["source"] == "measured" for r in records)
    device_j = sample(text, "wattproxy_device_energy_joules_total", 'device="gpu0"')
    attributed_j = sample(text, "wattproxy_attributed_energy_joules_total", 'device="gpu0"')
    idle_j = sample(
        text, "wattproxy_unattributed_energy_joules_total", 'device="gpu0",reason="idle"'
    )
    none_j = sample(
        text, "wattproxy_unattributed_energy_joules_total", 'device="gpu0",reason="no_requests"'
    )
    # the device total is exactly what the exporter's counter moved from the proxy's baseline
    # scrape (the meter's opening read or the sampler's first) to one of its later scrapes
    served = exporter.served_mj
    truths_j = {(served[k] - served[j]) / 1000.0 for j in range(2) for k in range(len(served))}
    assert any(abs(device_j - t) < 1e-6 for t in truths_j), (device_j, served[:3], served[-3:])
    assert device_j > 0
    assert attributed_j + idle_j + none_j == pytest.approx(device_j, rel=1e-6)
    # requests got the attributed joules, no more, no less (all of them are final)
    assert sum(r["energy_j"] for r in records) == pytest.approx(attributed_j, rel=1e-4)
    # at a constant 250 W with 100 W idle excluded, requests get 150 W x busy time at most
    assert all(r["energy_j"] > 0 for r in records)
