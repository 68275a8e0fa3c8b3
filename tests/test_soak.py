"""A bounded soak: mixed streaming and non-streaming traffic with random client aborts and
upstream faults (resets before and during answers, 500s, stalls past the first-byte timeout)
for a fixed time through a proxy with production runner settings. Afterwards: no file
descriptors or memory kept, nothing left open inside, exactly one record per request the
proxy forwarded, and every measured joule accounted for."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.app import PARTS
from proxy.ledger.sqlite import SQLiteLedger
from proxy.records import RequestRecord
from proxy.standins import StandIn
from tests.conftest import proxy_config, url_of
from tests.helpers.proxy_load import settle
from tests.helpers.service import running

WARMUP_S = 2.0
SOAK_S = 8.0
WORKERS = 16
#: File descriptors the process may hold afterwards beyond those before (logging, caches).
FD_TOLERANCE = 8
#: Growth of resident memory from the end of the warm-up to the end of the soak.
RSS_GROWTH_BOUND_BYTES = 40 * 1024 * 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def faulty(rng: random.Random, faults: Counter[str]) -> Any:
    """A middleware for the stand-in: some requests are reset, cut off, failed or stalled."""

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        roll = rng.random()
        transport = request.transport
        assert transport is not None
        if roll < 0.05:
            faults["reset_before_headers"] += 1
            await request.read()
            transport.close()
            raise ConnectionResetError("injected")
        if roll < 0.10:
            faults["error_500"] += 1
            return web.json_response({"error": {"message": "injected"}}, status=500)
        if roll < 0.13:
            faults["stall"] += 1
            await asyncio.sleep(0.8)  # past first_byte_s
        elif roll < 0.20:
            faults["reset_mid_answer"] += 1
            asyncio.get_running_loop().call_later(rng.uniform(0.0, 0.08), transport.close)
        return await handler(request)

    return inject


@pytest.mark.timeout(60)
async def test_soak_mixed_traffic_with_aborts_and_faults(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    rng = random.Random(20261129)
    faults: Counter[str] = Counter()
    standin = StandIn(flavor="vllm", scale=0.3, keep_requests=False)
    app = standin.app()
    app.middlewares.append(faulty(rng, faults))
    up = await aiohttp_server(app)
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        upstreams=[{"name": "llm", "url": url_of(up), "timeouts": {"first_byte_s": 0.5}}],
        listen={"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5},
        # every request sends its own unique id, as a gateway would: the records are found by
        # them, aborted requests' too
        identity={"trust_request_id": True},
    )
    gc.collect()
    fds_before = open_fds()
    submitted: Counter[str] = Counter()
    records: dict[str, RequestRecord] = {}
    sent: set[str] = set()
    answered: dict[str, int] = {}
    outcomes: Counter[str] = Counter()
    seq = iter(range(1_000_000))

    async with running(cfg) as svc:
        parts = svc.app[PARTS]
        sink = parts.accountant.sink

        def counting_sink(rec: RequestRecord) -> None:
            submitted[rec.request_id] += 1
            records[rec.request_id] = rec
            sink(rec)

        parts.accountant.sink = counting_sink
        base = f"http://127.0.0.1:{svc.port}"

        async def one(s: aiohttp.ClientSession) -> None:
            rid = f"soak-{next(seq)}"
            roll = rng.random()
            if roll < 0.45:
                path, body = "/v1/chat/completions", {"model": "m", "stream": True}
            elif roll < 0.85:
                path, body = "/v1/chat/completions", {"model": "m"}
            else:
                path, body = "/v1/embeddings", {"model": "e", "input": ["a b c", "d e"]}
            if "chat" in path:
                body["messages"] = [{"role": "user", "content": "one two three"}]
                body["max_tokens"] = rng.randint(1, 12)
            abort_after_s = rng.uniform(0.0, 0.15) if rng.random() < 0.15 else None
            sent.add(rid)
            try:
                async with asyncio.timeout(abort_after_s or 10.0):
                    async with s.post(base + path, json=body, headers={"X-Request-Id": rid}) as r:
                        answered[rid] = r.status
                        await r.read()
                outcomes[str(answered[rid])] += 1
            except TimeoutError:
                outcomes["client_abort"] += 1
            except aiohttp.ClientError as e:
                outcomes[type(e).__name__] += 1

        async def worker(until: float) -> None:
            async with aiohttp.ClientSession() as s:
                while time.monotonic() < until:
                    await one(s)

        await asyncio.gather(*(worker(time.monotonic() + WARMUP_S) for _ in range(WORKERS)))
        await settle(parts)
        gc.collect()
        rss_after_warmup = rss_bytes()
        await asyncio.gather(*(worker(time.monotonic() + SOAK_S) for _ in range(WORKERS)))
        await settle(parts)
        gc.collect()
        rss_growth = rss_bytes() - rss_after_warmup

        # nothing left open inside
        assert parts.accountant.requests == {}
        reg = parts.metrics.registry
        assert reg.get_sample_value("wattproxy_inflight_requests", {"upstream": "llm"}) == 0
        # conservation per device, and the records hold all the attributed energy
        await parts.sampler.read_once()
        for device, totals in parts.engine.devices.items():
            unattributed = totals.idle_j + totals.no_requests_j
            assert totals.attributed_j + unattributed == pytest.approx(totals.measured_j, rel=1e-6)
            assert totals.measured_j > 0, device
        attributed = sum(t.attributed_j for t in parts.engine.devices.values())
        measured_records = sum(r.energy_j for r in records.values() if r.source == "measured")
        assert measured_records == pytest.approx(attributed, rel=1e-4)
        forwarded = sum(
            reg.get_sample_value("wattproxy_requests_total", s.labels) or 0
            for metric in reg.collect()
            if metric.name == "wattproxy_requests"
            for s in metric.samples
            if s.name == "wattproxy_requests_total"
        )

    await asyncio.sleep(0.2)  # let the upstream notice the proxy's closed connections
    gc.collect()
    fds_after = open_fds()

    # the run did what it says: real traffic, every kind of fault, aborts and timeouts
    total = len(sent)
    assert total > 300, total
    assert min(faults.values()) > 3 and len(faults) == 4, faults
    assert outcomes["client_abort"] > 10, outcomes
    assert outcomes["200"] > total / 2, outcomes
    assert outcomes["504"] > 0 and outcomes["502"] > 0, outcomes

    # exactly one record per forwarded request, none for requests never sent, all in the ledger
    assert max(submitted.values()) == 1, [k for k, v in submitted.items() if v > 1][:5]
    assert set(submitted) <= sent
    assert set(answered) <= set(submitted)  # every request that got an answer has its record
    assert len(submitted) == forwarded
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"))
    await ledger.open()
    try:
        in_ledger = {rid for rid in sent if await ledger.get(rid) is not None}
        day = next(iter(records.values())).started_at[:10]
        rows = await ledger.aggregates(day, day)
    finally:
        await ledger.close()
    assert in_ledger == set(submitted)
    assert sum(r.requests for r in rows) == len(submitted)

    assert fds_after <= fds_before + FD_TOLERANCE, (fds_before, fds_after)
    assert rss_growth < RSS_GROWTH_BOUND_BYTES, rss_growth
