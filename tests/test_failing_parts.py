"""Failing parts: the meter, the ledger and the carbon provider go down and requests go on,
marked for what they are; SIGHUP reloads the config without dropping a connection; SIGTERM
drains requests in flight and flushes the ledger. Signals go to a real ``wattproxy serve``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from estimators.errors import MeterError
from estimators.meters import Reading, SimulatedMeter
from proxy.config import load_config
from proxy.ledger.sqlite import SQLiteLedger
from proxy.reload import apply_config
from proxy.standins import StandIn
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.proxy_load import settle
from tests.helpers.redis_server import RedisServer
from tests.helpers.serve import base_config, free_port, serve_process
from tests.helpers.service import running
from tests.helpers.through_proxy import CHAT, final_record

# -- the meter -------------------------------------------------------------------------------


class FailingMeter(SimulatedMeter):
    """The simulated meter behind a switch: with ``failing`` set, every read raises
    ``MeterError`` as a driver that lost the GPU would."""

    def __init__(self) -> None:
        super().__init__(noise=0.0)  # its load: its own tracker, told by the proxy
        self.failing = False
        self.failed_reads = 0

    def read(self) -> Reading:
        if self.failing:
            self.failed_reads += 1
            raise MeterError("NVML_ERROR_GPU_IS_LOST")
        return super().read()


async def chat(base: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(base + "/v1/chat/completions", json=body or CHAT) as r,
    ):
        await r.read()
        return r.status, r.headers["X-Request-Id"]


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_meter_down_requests_go_on_estimated_and_measured_again_after(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    meter = FailingMeter()
    proxy, parts = await make_proxy(proxy_config(url_of(upstream), tmp_path), meter=meter)
    parts.accountant.down_after_s = 0.2  # give up on a dead device quickly (default 5 s)
    base = url_of(proxy)
    status, rid = await chat(base)
    assert status == 200
    assert (await final_record(base, rid))["source"] == "measured"

    meter.failing = True
    await wait_for(lambda: meter.failed_reads >= 2)
    reg = parts.metrics.registry
    assert reg.get_sample_value("wattproxy_meter_up", {"device": "gpu0", "kind": "simulated"}) == 0
    down = [await chat(base, {**CHAT, "max_tokens": 8}) for _ in range(3)]
    assert [s for s, _ in down] == [200, 200, 200]
    for _, rid in down:
        rec = await final_record(base, rid)
        assert rec["source"] == "estimated"
        assert rec["energy_j"] > 0 and rec["co2e_g"] > 0

    meter.failing = False
    await wait_for(
        lambda: (
            reg.get_sample_value("wattproxy_meter_up", {"device": "gpu0", "kind": "simulated"}) == 1
        )
    )
    status, rid = await chat(base)
    assert status == 200
    assert (await final_record(base, rid))["source"] == "measured"


async def test_meter_failing_mid_request_makes_it_estimated_not_lost(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    slow = StandIn(flavor="vllm", scale=5.0)  # ~60 ms per token
    up = await aiohttp_server(slow.app())
    meter = FailingMeter()
    proxy, parts = await make_proxy(proxy_config(url_of(up), tmp_path), meter=meter)
    parts.accountant.down_after_s = 0.2
    base = url_of(proxy)
    async with (
        aiohttp.ClientSession() as s,
        s.post(base + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 10}) as r,
    ):
        rid = r.headers["X-Request-Id"]
        await r.content.readuntil(b"\n\n")
        meter.failing = True  # the GPU is lost while the answer streams
        body = await r.read()
    assert body.endswith(b"data: [DONE]\n\n")
    rec = await final_record(base, rid)
    assert rec["source"] == "estimated"
    assert rec["energy_j"] > 0
    assert rec["completion_tokens"] == 10


# -- the ledger ------------------------------------------------------------------------------


async def test_ledger_down_spools_and_replays_none_lost_none_doubled(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        cfg = proxy_config(
            url_of(upstream),
            tmp_path,
            ledger={
                "url": f"redis://127.0.0.1:{redis.port}/0",
                "flush_interval_ms": 20,
                "spool_path": str(tmp_path / "spool.jsonl"),
            },
        )
        proxy, parts = await make_proxy(cfg)
        base = url_of(proxy)
        rids = [(await chat(base))[1]]
        await settle(parts)
        assert await parts.ledger.get(rids[0]) is not None

        redis.stop()
        for _ in range(12):
            status, rid = await chat(base)
            assert status == 200  # the ledger being down is nobody's business but ours
            rids.append(rid)
        await wait_for(lambda: parts.writer.spooled > 0, timeout_s=15)
        assert (tmp_path / "spool.jsonl").exists()
        async with aiohttp.ClientSession() as s, s.get(base + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["ledger"]["ok"] is False
        reg = parts.metrics.registry
        assert (
            reg.get_sample_value("wattproxy_ledger_errors_total", {"backend": "redis"}) or 0
        ) > 0

        redis.start()  # same port, same append-only file
        await settle(parts, timeout_s=20)
        for rid in rids:
            got = await parts.ledger.get(rid)
            assert got is not None and got.request_id == rid
        today = parts.recent.get(rids[-1])
        assert today is not None
        day = today.started_at[:10]
        rows = await parts.ledger.aggregates(day, day, user="anonymous")
        assert sum(r.requests for r in rows) == len(rids)  # each once: none lost, none doubled
        assert not (tmp_path / "spool.jsonl").exists()  # replayed and removed


# -- the carbon provider ---------------------------------------------------------------------


async def test_carbon_provider_down_falls_back_to_the_table(
    upstream: TestServer, aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    calls: list[str] = []

    async def broken(request: web.Request) -> web.Response:
        calls.append(request.path_qs)
        return web.Response(status=500, text="internal error")

    app = web.Application()
    app.router.add_get("/{tail:.*}", broken)
    provider = await aiohttp_server(app)
    cfg = proxy_config(
        url_of(upstream),
        tmp_path,
        carbon={"provider": "electricitymaps", "zone": "DE", "url": url_of(provider)},
    )
    proxy, parts = await make_proxy(cfg)
    await wait_for(lambda: bool(calls))
    status, rid = await chat(url_of(proxy))
    assert status == 200
    rec = await final_record(url_of(proxy), rid)
    assert rec["co2e_g"] > 0  # the table's figure for DE, not zero
    async with aiohttp.ClientSession() as s, s.get(url_of(proxy) + "/metrics") as r:
        text = await r.text()
    assert (
        'wattproxy_carbon_provider_info{fallback="true",provider="electricitymaps",zone="DE"} 1.0'
        in text
    )
    table = parts.metrics.registry.get_sample_value(
        "wattproxy_grid_carbon_intensity_grams_per_kwh", {"zone": "DE"}
    )
    assert table is not None and table > 0


# -- a real process: SIGHUP and SIGTERM ------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sighup_reloads_upstreams_without_dropping_a_stream(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    slow = StandIn(flavor="vllm", scale=10.0)  # ~120 ms per token: a 24-token stream ~3 s
    old_up = await aiohttp_server(slow.app())
    new_up = await aiohttp_server(StandIn(flavor="vllm", scale=0.0).app())
    doc = base_config(url_of(old_up), tmp_path)
    doc["upstreams"] = [{"name": "old", "url": url_of(old_up), "models": ["m"]}]
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        body = {**CHAT, "model": "new-model"}
        async with s.post(served.base + "/v1/chat/completions", json=body) as r:
            assert r.status == 404  # nothing serves it yet

        long = await s.post(
            served.base + "/v1/chat/completions",
            json={**CHAT, "stream": True, "max_tokens": 24},
        )
        assert long.status == 200
        await long.content.readuntil(b"\n\n")  # the stream is under way

        # "old" changes too (a new connection pool): the stream stays on the one it started on
        doc["upstreams"][0]["max_connections"] = 500
        doc["upstreams"].append({"name": "new", "url": url_of(new_up), "models": ["new-*"]})
        served.config_path.write_text(yaml.safe_dump(doc))
        served.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            async with s.post(served.base + "/v1/chat/completions", json=body) as r:
                if r.status == 200:
                    assert (await r.json())["model"] == "new-model"
                    break
            assert time.monotonic() < deadline, served.output()
            await asyncio.sleep(0.05)
        assert not long.content.at_eof()  # the reload happened while it streamed
        rest = await long.read()
        long.release()
        assert rest.endswith(b"data: [DONE]\n\n")  # the stream in flight was not dropped

        # an invalid config is refused: logged, and the running one stays
        served.config_path.write_text("upstreams: [{url: 'not a url'}]\n")
        served.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload of" not in served.output():
            assert time.monotonic() < deadline, served.output()
            await asyncio.sleep(0.05)
        async with s.post(served.base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
        async with s.post(
            served.base + "/v1/chat/completions", json={**CHAT, "max_tokens": 1}
        ) as r:
            assert r.status == 200
        assert served.proc.poll() is None
    out = served.output()
    assert "upstreams.0.url" in out  # the problem, with its key path
    assert "Traceback" not in out


@pytest.mark.timeout(60)
async def test_sigterm_finishes_the_stream_in_flight_and_flushes_the_ledger(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    slow = StandIn(flavor="vllm", scale=10.0)
    up = await aiohttp_server(slow.app())
    doc = base_config(url_of(up), tmp_path, listen={"port": free_port(), "shutdown_grace_s": 15})
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        resp = await s.post(
            served.base + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 16}
        )
        rid = resp.headers["X-Request-Id"]
        await resp.content.readuntil(b"\n\n")
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # no new connections once draining
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh, fresh.get(served.base + "/healthz") as r:
                await r.read()
        rest = await resp.read()
        resp.release()
        assert rest.endswith(b"data: [DONE]\n\n")
        rc = await asyncio.to_thread(served.proc.wait, 20)
    assert rc == 0, served.output()
    assert "Traceback" not in served.output()
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"))
    await ledger.open()
    try:
        rec = await ledger.get(rid)
    finally:
        await ledger.close()
    assert rec is not None
    assert rec.outcome == "ok" and rec.completion_tokens == 16
    assert rec.final is True
    assert not (tmp_path / "spool.jsonl").exists()


@pytest.mark.timeout(60)
async def test_sigterm_cuts_streams_that_outlast_the_grace_and_still_records_them(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    slow = StandIn(flavor="vllm", scale=20.0)  # ~240 ms per token: 100 tokens ~24 s
    up = await aiohttp_server(slow.app())
    grace_s = 1.0
    doc = base_config(
        url_of(up), tmp_path, listen={"port": free_port(), "shutdown_grace_s": grace_s}
    )
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        resp = await s.post(
            served.base + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 100}
        )
        rid = resp.headers["X-Request-Id"]
        await resp.content.readuntil(b"\n\n")
        start = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(aiohttp.ClientError):
            await resp.read()
        resp.release()
        rc = await asyncio.to_thread(served.proc.wait, 20)
        took = time.monotonic() - start
    assert rc == 0, served.output()
    assert took < grace_s + 8, took
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"))
    await ledger.open()
    try:
        rec = await ledger.get(rid)
    finally:
        await ledger.close()
    assert rec is not None  # cut short, but accounted for
    assert rec.completion_tokens is not None and rec.completion_tokens < 100
    assert rec.outcome != "ok"


async def test_reload_applies_keys_budgets_limits_and_names_what_needs_a_restart(
    upstream: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def keys(name: str, key: str, user: str) -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"keys": [{"key": key, "user": user}]}))
        return str(path)

    doc = base_config(url_of(upstream), tmp_path)
    doc["listen"] = {"host": "127.0.0.1", "port": 0}
    doc["identity"] = {"keys_file": keys("k1.yaml", "key-one", "alice")}
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(doc))
    async with running(load_config(path, environ={}), config_path=str(path)) as svc:
        base = f"http://127.0.0.1:{svc.port}"

        async def status(key: str, body: dict[str, Any] = CHAT) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            async with (
                aiohttp.ClientSession() as s,
                s.post(base + "/v1/chat/completions", json=body, headers=headers) as r,
            ):
                return r.status

        assert (await status("key-one"), await status("key-two")) == (200, 401)
        doc["identity"]["keys_file"] = keys("k2.yaml", "key-two", "bob")
        doc["budgets"] = {"users": {"bob": {"grams_per_day": 0}}}
        doc["limits"] = {"max_body_bytes": 200}
        doc["meter"] = {**doc["meter"], "interval_ms": 50}  # applies after a restart only
        path.write_text(yaml.safe_dump(doc))
        assert await svc.reload() is True
        assert await status("key-one") == 401  # the old key is gone
        assert await status("key-two") == 429  # bob's budget applies
        assert await status("key-two", {**CHAT, "pad": "x" * 300}) == 413  # the new limit
        assert "changes to meter apply after a restart" in caplog.text

        doc["identity"]["keys_file"] = str(tmp_path / "missing.yaml")
        path.write_text(yaml.safe_dump(doc))
        assert await svc.reload() is False
        assert await status("key-two") == 429  # the running config stayed
        assert "missing.yaml: no such file" in caplog.text


# -- sessions retired by a reload --------------------------------------------------------------


async def test_a_session_retired_by_a_reload_closes_once_its_stream_ends(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    go = asyncio.Event()

    async def held_stream(request: web.Request) -> web.StreamResponse:
        """One event, then the rest once ``go`` is set."""
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        await resp.write(event)
        await go.wait()
        await resp.write(event + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", held_stream)
    up = await aiohttp_server(app)
    proxy, parts = await make_proxy(proxy_config(url_of(up), tmp_path))
    old = parts.runtime.sessions["llm"]
    async with aiohttp.ClientSession() as s:
        r = await s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True})
        await r.content.readuntil(b"\n\n")  # the stream is under way, through ``old``
        # a changed upstream gets a new session; the old one is retired
        upstreams = [{"name": "llm", "url": url_of(up), "max_connections": 7}]
        changed = proxy_config(url_of(up), tmp_path, upstreams=upstreams)
        assert await apply_config(parts, changed) == []  # nothing left for a restart
        new = parts.runtime.sessions["llm"]
        assert new is not old and old.retired and old.in_flight == 1
        await asyncio.sleep(0)  # a close, had one been scheduled, would have run
        assert not old.session.closed  # the stream still goes through it
        await apply_config(parts, changed)  # the same again: the new session stays
        assert parts.runtime.sessions["llm"] is new
        go.set()
        rest = await r.read()
        r.release()
    assert rest.endswith(b"data: [DONE]\n\n")  # not dropped by the reload
    await wait_for(lambda: old.session.closed)  # closed once its last stream ended
    assert not new.session.closed and parts.sessions.retired == 0


async def test_a_session_retired_with_no_request_on_it_closes_at_once(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, parts = await make_proxy(proxy_config(url_of(upstream), tmp_path))
    status, _ = await chat(url_of(proxy))
    assert status == 200
    old = parts.runtime.sessions["llm"]
    upstreams = [{"name": "other", "url": url_of(upstream)}]  # "llm" is gone
    await apply_config(parts, proxy_config(url_of(upstream), tmp_path, upstreams=upstreams))
    assert "llm" not in parts.runtime.sessions
    await wait_for(lambda: old.session.closed)
    assert parts.sessions.retired == 0
