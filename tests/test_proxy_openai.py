"""wattproxy in front of OpenAI-compatible servers, over real loopback HTTP.

The upstreams here replay the exact bytes of vLLM, llama.cpp server and transformers serve
(older, 5.24 and 5.25; tests/helpers/openai_replays.py), so byte equality can be asserted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.openai_replays import (
    LLAMACPP,
    NON_STREAM,
    TRANSFORMERS,
    TRANSFORMERS_5_24,
    TRANSFORMERS_5_25,
    TRANSFORMERS_5_25_USAGE,
    VLLM_CLIENT_VIEW,
    VLLM_WITH_USAGE,
)
from tests.helpers.serve import free_port
from tests.helpers.through_proxy import CHAT, final_record


def events(stream: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in stream.split(b"\n\n") if e]


class Scripted:
    """An upstream that replays canned bytes, one SSE event per write, and logs what it saw."""

    def __init__(self, flavor: str = "vllm", delay_s: float = 0.0) -> None:
        self.flavor = flavor
        self.delay_s = delay_s
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnected = asyncio.Event()
        self.gate: asyncio.Event | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response({"object": "list", "data": []}, headers={"X-Upstream": "1"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        self.bodies.append(doc)
        self.headers.append(dict(request.headers))
        if not doc.get("stream"):
            return web.Response(body=NON_STREAM, content_type="application/json")
        asked = (doc.get("stream_options") or {}).get("include_usage")
        stream = {
            "vllm": VLLM_WITH_USAGE if asked else VLLM_CLIENT_VIEW,
            "llamacpp": LLAMACPP,
            "transformers": TRANSFORMERS,
            "transformers 5.24": TRANSFORMERS_5_24,
            "transformers 5.25": TRANSFORMERS_5_25_USAGE if asked else TRANSFORMERS_5_25,
        }[self.flavor]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        try:
            for i, ev in enumerate(events(stream)):
                await resp.write(ev)
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp


async def scripted_server(aiohttp_server: Any, flavor: str = "vllm", delay_s: float = 0.0):  # type: ignore[no-untyped-def]
    s = Scripted(flavor, delay_s)
    server: TestServer = await aiohttp_server(s.app())
    return s, server


@pytest.mark.parametrize(
    ("flavor", "ask", "expected_client_bytes", "prompt", "completion", "source"),
    [
        ("vllm", False, VLLM_CLIENT_VIEW, 7, 3, "server"),
        ("vllm", True, VLLM_WITH_USAGE, 7, 3, "server"),
        ("llamacpp", False, LLAMACPP, 7, 3, "server"),
        ("transformers", False, TRANSFORMERS, 4, 3, "estimate"),  # 13 bytes / 4
        ("transformers 5.24", False, TRANSFORMERS_5_24, 10, 6, "server"),
        # the usage chunk the proxy asked for taken out; six tokens in four text events
        ("transformers 5.25", False, TRANSFORMERS_5_25, 10, 6, "server"),
        ("transformers 5.25", True, TRANSFORMERS_5_25_USAGE, 10, 6, "server"),
    ],
)
async def test_stream_bytes_and_usage(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    flavor: str,
    ask: bool,
    expected_client_bytes: bytes,
    prompt: int,
    completion: int,
    source: str,
) -> None:
    scripted, up = await scripted_server(aiohttp_server, flavor)
    proxy, _parts = await make_proxy(proxy_config(url_of(up), tmp_path))
    body: dict[str, Any] = {**CHAT, "stream": True}
    if ask:
        body["stream_options"] = {"include_usage": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=body) as r,
    ):
        got = await r.read()
        rid = r.headers["X-Request-Id"]
        assert r.headers["X-Wattproxy-Task"] == "text-generation"
        assert r.headers["Content-Type"].startswith("text/event-stream")
    assert got == expected_client_bytes
    # the proxy always asked the upstream for usage
    assert scripted.bodies[0]["stream_options"]["include_usage"] is True
    rec = await final_record(url_of(proxy), rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (prompt, completion)
    assert rec["tokens_source"] == source
    assert rec["source"] == "measured"
    assert rec["energy_j"] > 0
    assert rec["task"] == "text-generation"


async def test_non_stream_byte_equality_and_usage(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    _scripted, up = await scripted_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert await r.read() == NON_STREAM
        assert r.headers["Content-Length"] == str(len(NON_STREAM))
        rid = r.headers["X-Request-Id"]
    rec = await final_record(url_of(proxy), rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (11, 2)
    assert rec["status"] == 200


async def test_first_chunk_arrives_while_upstream_still_generating(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    scripted, up = await scripted_server(aiohttp_server)
    scripted.gate = asyncio.Event()
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 2.0)
        assert b'"role":"assistant"' in first
        assert not scripted.gate.is_set()  # the upstream is still held at its first event
        scripted.gate.set()
        rest = await r.read()
    assert first + rest == VLLM_CLIENT_VIEW


async def test_client_disconnect_cancels_upstream_and_records_partial(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    scripted, up = await scripted_server(aiohttp_server, delay_s=0.3)
    proxy, _parts = await make_proxy(proxy_config(url_of(up), tmp_path))
    s = aiohttp.ClientSession()
    r = await s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True})
    rid = r.headers["X-Request-Id"]
    await r.content.readuntil(b"\n\n")
    await r.content.readuntil(b"\n\n")
    r.close()
    await s.close()
    await asyncio.wait_for(scripted.disconnected.wait(), 5.0)
    rec = await final_record(url_of(proxy), rid)
    assert rec["outcome"] == "client_disconnect"
    assert rec["completion_tokens"] is not None and rec["completion_tokens"] < 3
    assert rec["energy_j"] > 0


async def test_upstream_refused_is_502_json(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy, _ = await make_proxy(proxy_config(f"http://127.0.0.1:{free_port()}", tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 502
        doc = await r.json()
        assert doc["error"]["type"] == "upstream_error"
        assert "unreachable" in doc["error"]["message"]
        assert r.headers["X-Request-Id"]
        assert r.headers["X-Wattproxy-Task"] == "text-generation"


async def test_upstream_timeout_is_504(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow)
    up = await aiohttp_server(app)
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        upstreams=[{"name": "llm", "url": url_of(up), "timeouts": {"first_byte_s": 0.2}}],
    )
    proxy, _ = await make_proxy(cfg)
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 504
        assert (await r.json())["error"]["type"] == "upstream_timeout"


async def test_upstream_reset_before_headers_is_502(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    async def reset(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reset)
    up = await aiohttp_server(app)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "upstream_error"


async def test_upstream_reset_mid_stream_aborts_the_client_stream(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    async def half(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in events(VLLM_CLIENT_VIEW)[:2]:
            await resp.write(ev)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", half)
    up = await aiohttp_server(app)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        relayed = b"".join(events(VLLM_CLIENT_VIEW)[:2])
        got = await r.content.readexactly(len(relayed))
        with pytest.raises(aiohttp.ClientPayloadError):  # broken off, as the upstream did
            await r.read()
        rid = r.headers["X-Request-Id"]
    assert got == relayed
    rec = await final_record(url_of(proxy), rid)
    assert rec["outcome"] == "upstream_reset"
    assert rec["completion_tokens"] == 1


async def test_headers_hop_by_hop_and_request_id(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    scripted, up = await scripted_server(aiohttp_server)
    # behind a gateway that issues unique ids (by default the proxy makes its own:
    # tests/test_request_ids.py)
    cfg = proxy_config(url_of(up), tmp_path, identity={"trust_request_id": True})
    proxy, _ = await make_proxy(cfg)
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "X-Request-Id": "client-id-123",
        "X-Custom": "kept",
    }
    async with (
        aiohttp.ClientSession() as s,
        s.get(url_of(proxy) + "/v1/models", headers=headers) as r,
    ):
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "client-id-123"
        assert r.headers["X-Upstream"] == "1"
        assert r.headers["X-Wattproxy-Task"] == "other"
    seen = {k.lower(): v for k, v in scripted.headers[0].items()}
    assert "x-secret-hop" not in seen and "keep-alive" not in seen
    assert seen["x-custom"] == "kept"
    assert seen["x-request-id"] == "client-id-123"
    async with (
        aiohttp.ClientSession() as s,
        s.get(url_of(proxy) + "/v1/models", headers={"X-Request-Id": "bad id\u00e9"}) as r,
    ):
        assert r.headers["X-Request-Id"] != "bad id\u00e9"
        assert len(r.headers["X-Request-Id"]) == 32


async def test_routing_by_model_across_upstreams(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    a, up_a = await scripted_server(aiohttp_server)
    b, up_b = await scripted_server(aiohttp_server)
    cfg = proxy_config(
        url_of(up_a),
        tmp_path,
        upstreams=[
            {"name": "small", "url": url_of(up_a), "models": ["llama-8b"]},
            {"name": "big", "url": url_of(up_b), "models": ["llama-70b", "mixtral-*"]},
        ],
    )
    proxy, _ = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for model in ("llama-8b", "mixtral-8x7b", "llama-70b"):
            async with s.post(
                url_of(proxy) + "/v1/chat/completions", json={**CHAT, "model": model}
            ) as r:
                assert r.status == 200
        async with s.post(
            url_of(proxy) + "/v1/chat/completions", json={**CHAT, "model": "gpt-9"}
        ) as r:
            assert r.status == 404
            err = (await r.json())["error"]
            assert err["type"] == "not_found_error" and err["code"] == "model_not_found"
    assert [x["model"] for x in a.bodies] == ["llama-8b"]
    assert [x["model"] for x in b.bodies] == ["mixtral-8x7b", "llama-70b"]


async def test_conservation_through_the_whole_pipeline(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Every joule the simulated meter measured is attributed or reported unattributed, and
    the finals' energies add up to the attributed total."""
    proxy, parts = await make_proxy(proxy_config(url_of(upstream), tmp_path))
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> str:
            body = {**CHAT, "stream": i % 2 == 0, "max_tokens": 5 + i % 7}
            async with s.post(url_of(proxy) + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.headers["X-Request-Id"]

        rids = await asyncio.gather(*(one(i) for i in range(30)))
    records = [await final_record(url_of(proxy), rid) for rid in rids]
    await parts.sampler.read_once()
    totals = parts.engine.devices["gpu0"]
    assert totals.measured_j > 0
    unattributed = totals.idle_j + totals.no_requests_j
    assert totals.attributed_j + unattributed == pytest.approx(totals.measured_j, rel=1e-6)
    assert sum(r["energy_j"] for r in records) == pytest.approx(totals.attributed_j, rel=1e-4)
    reg = parts.metrics.registry
    device = reg.get_sample_value("wattproxy_device_energy_joules_total", {"device": "gpu0"})
    attributed = reg.get_sample_value(
        "wattproxy_attributed_energy_joules_total", {"device": "gpu0"}
    )
    idle = (
        reg.get_sample_value(
            "wattproxy_unattributed_energy_joules_total", {"device": "gpu0", "reason": "idle"}
        )
        or 0.0
    )
    none = (
        reg.get_sample_value(
            "wattproxy_unattributed_energy_joules_total",
            {"device": "gpu0", "reason": "no_requests"},
        )
        or 0.0
    )
    assert device == pytest.approx(attributed + idle + none, rel=1e-6)


async def test_health_ready_and_metrics(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await make_proxy(proxy_config(url_of(upstream), tmp_path))
    async with aiohttp.ClientSession() as s:
        async with s.get(url_of(proxy) + "/healthz") as r:
            assert r.status == 200
        async with s.get(url_of(proxy) + "/readyz") as r:
            doc = await r.json()
            assert r.status == 200 and doc["ready"] and doc["upstreams"] == {"llm": True}
        async with s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r:
            await r.read()
        async with s.get(url_of(proxy) + "/metrics") as r:
            text = await r.text()
    assert (
        'wattproxy_requests_total{code="200",model="m",task="text-generation",upstream="llm"}'
        in text
    )
    assert "wattproxy_meter_up" in text
    assert "wattproxy_device_power_watts" in text


async def test_readyz_503_when_upstream_down(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy, _ = await make_proxy(proxy_config(f"http://127.0.0.1:{free_port()}", tmp_path))
    async with aiohttp.ClientSession() as s, s.get(url_of(proxy) + "/readyz") as r:
        assert r.status == 503
        assert (await r.json())["upstreams"] == {"llm": False}


async def test_unmetered_requests_are_estimated_never_zero(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    cfg = proxy_config(url_of(upstream), tmp_path, meter={"kind": "none"})
    proxy, _ = await make_proxy(cfg)
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "max_tokens": 20}) as r,
    ):
        rid = r.headers["X-Request-Id"]
    rec = await final_record(url_of(proxy), rid)
    assert rec["source"] == "estimated"
    assert rec["energy_j"] > 0 and rec["co2e_g"] > 0
    assert "prior" in rec["basis"] or "estimate" in rec["basis"] or rec["basis"]


async def test_body_is_forwarded_unchanged_when_no_usage_injection_needed(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    scripted, up = await scripted_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    raw = b'{"model": "m",  "messages": [{"role":"user","content":"x"}], "extra_field": [1,2]}'
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url_of(proxy) + "/v1/chat/completions",
            data=raw,
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        assert r.status == 200
    assert scripted.bodies[0] == json.loads(raw)


async def test_access_log_is_one_json_line_per_request(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = proxy_config(url_of(upstream), tmp_path, log={"access_log": True})
    proxy, _ = await make_proxy(cfg)
    caplog.set_level("INFO", logger="wattproxy.access")
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        rid = r.headers["X-Request-Id"]
    await final_record(url_of(proxy), rid)
    lines = [
        json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "wattproxy.access"
    ]
    assert [line["request_id"] for line in lines] == [rid]
    assert lines[0]["final"] is True and lines[0]["energy_j"] > 0
    assert set(lines[0]) >= {"user", "task", "model", "co2e_g", "source", "status"}
