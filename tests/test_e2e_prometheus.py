"""A real Prometheus server scrapes a real `wattproxy serve` every second: after a load, PromQL's
``sum(wattproxy_co2e_grams_total)`` equals the ledger's total."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.standins import StandIn
from tests.helpers.serve import free_port, wait_http, wattproxy_serve


@pytest.mark.timeout(90)
async def test_promql_total_equals_the_ledger(aiohttp_server: Any, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (make test runs scripts/ensure-prometheus.sh)")
    up = await aiohttp_server(StandIn(scale=0.2, keep_requests=False).app())
    prom_port = free_port()
    cfg = {
        "upstreams": [{"name": "llm", "url": f"http://127.0.0.1:{up.port}"}],
        "meter": {"kind": "simulated", "interval_ms": 50},
        "carbon": {"zone": "DE", "pue": 1.1},
        "ledger": {"url": f"sqlite:///{tmp_path / 'l.db'}", "flush_interval_ms": 50},
    }
    async with wattproxy_serve(cfg, tmp_path) as served:
        port = served.base.rsplit(":", 1)[1]
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "wattproxy",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                        }
                    ],
                }
            )
        )
        prom = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await drive_and_compare(served.base, f"http://127.0.0.1:{prom_port}")
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prom.kill()


async def drive_and_compare(base: str, prom_base: str) -> None:
    """40 requests, then wait until the ledger and PromQL agree."""
    async with aiohttp.ClientSession() as s:
        await wait_http(s, prom_base + "/-/ready")

        async def one(i: int) -> None:
            body = {
                "model": "llama" if i % 3 else "mistral",
                "messages": [{"role": "user", "content": "hello " * (i % 9 + 1)}],
                "max_tokens": 4 + i % 6,
                "stream": i % 2 == 0,
            }
            headers = {"X-Request-Id": f"prom-{i}"}
            async with s.post(base + "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200
                await r.read()

        await asyncio.gather(*(one(i) for i in range(40)))
        # wait until every record is final and in the ledger
        deadline = time.monotonic() + 20
        while True:
            async with s.get(base + "/v1/emissions/summary") as r:
                summary = await r.json()
            if summary["totals"]["requests"] == 40:
                break
            assert time.monotonic() < deadline, summary["totals"]
            await asyncio.sleep(0.1)
        ledger_g = summary["totals"]["co2e_g"]
        assert ledger_g > 0
        # then until Prometheus has scraped the finished counters
        query = urllib.parse.urlencode({"query": "sum(wattproxy_co2e_grams_total)"})
        deadline = time.monotonic() + 20
        while True:
            async with s.get(f"{prom_base}/api/v1/query?{query}") as r:
                result = json.loads(await r.text())["data"]["result"]
            promql_g = float(result[0]["value"][1]) if result else -1.0
            if promql_g == pytest.approx(ledger_g, rel=1e-6):
                break
            assert time.monotonic() < deadline, (promql_g, ledger_g)
            await asyncio.sleep(0.25)
        query = urllib.parse.urlencode({"query": "sum(wattproxy_requests_total)"})
        async with s.get(f"{prom_base}/api/v1/query?{query}") as r:
            result = json.loads(await r.text())["data"]["result"]
        assert float(result[0]["value"][1]) == 40
