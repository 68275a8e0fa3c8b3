"""Routing and config promises, through the proxy on loopback: JSON bodies are routed by their
model whatever Content-Type the client sent, prefixes match whole path segments, and /readyz
follows ``health.ready_when``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.serve import free_port

CHAT_RAW = b'{"model": "%s",  "messages": [{"role": "user", "content": "hi"}]}'
ANSWER = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1}}'


class Recording:
    """An upstream that answers every path with a small JSON answer and keeps each request's
    path, Content-Type and raw body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.any)
        return app

    async def any(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.path, request.headers.get("Content-Type", ""), body))
        return web.Response(body=ANSWER, content_type="application/json")


async def recording(aiohttp_server: Any) -> tuple[Recording, TestServer]:
    rec = Recording()
    server: TestServer = await aiohttp_server(rec.app())
    return rec, server


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "text/plain; charset=utf-8", None],
)
async def test_a_json_body_is_routed_by_model_whatever_its_content_type(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, content_type: str | None
) -> None:
    """curl -d sends application/x-www-form-urlencoded: the body is still JSON on a JSON
    endpoint, so it is routed by its model and an unserved model is 404; the upstream gets the
    client's bytes and Content-Type unchanged."""
    gpt, up_gpt = await recording(aiohttp_server)
    llama, up_llama = await recording(aiohttp_server)
    cfg = proxy_config(
        url_of(up_gpt),
        tmp_path,
        upstreams=[
            {"name": "gpt", "url": url_of(up_gpt), "models": ["gpt-*"]},
            {"name": "llama", "url": url_of(up_llama), "models": ["llama-*"]},
        ],
    )
    proxy, _ = await make_proxy(cfg)
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with aiohttp.ClientSession(skip_auto_headers=("Content-Type",)) as s:
        for model in ("llama-3", "gpt-4o"):
            async with s.post(
                url_of(proxy) + "/v1/chat/completions",
                data=CHAT_RAW % model.encode(),
                headers=headers,
            ) as r:
                assert r.status == 200, await r.text()
        async with s.post(
            url_of(proxy) + "/v1/chat/completions", data=CHAT_RAW % b"mistral", headers=headers
        ) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"
    assert [json.loads(b)["model"] for _, _, b in llama.seen] == ["llama-3"]
    assert [json.loads(b)["model"] for _, _, b in gpt.seen] == ["gpt-4o"]
    path, ctype, body = llama.seen[0]
    assert path == "/v1/chat/completions"
    assert body == CHAT_RAW % b"llama-3"  # byte for byte
    assert ctype == (content_type or "")


async def test_other_apis_json_endpoints_are_routed_by_model_too(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """TGI's /generate and Ollama's /api/chat read JSON bodies: curl -d reaches the right one."""
    a, up_a = await recording(aiohttp_server)
    b, up_b = await recording(aiohttp_server)
    cfg = proxy_config(
        url_of(up_a),
        tmp_path,
        upstreams=[
            {"name": "tgi", "url": url_of(up_a), "api": "tgi", "models": ["tgi-model"]},
            {"name": "ollama", "url": url_of(up_b), "api": "ollama", "models": ["llama3*"]},
        ],
    )
    proxy, _ = await make_proxy(cfg)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    async with aiohttp.ClientSession() as s:
        for path, model in (("/api/chat", "llama3.2"), ("/generate", "tgi-model")):
            body = json.dumps({"model": model, "inputs": "x", "stream": False}).encode()
            async with s.post(url_of(proxy) + path, data=body, headers=form) as r:
                assert r.status == 200, await r.text()
    assert [p for p, _, _ in a.seen] == ["/generate"]
    assert [p for p, _, _ in b.seen] == ["/api/chat"]


async def test_a_non_json_upload_to_a_non_json_endpoint_still_streams_unparsed(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Form bodies on paths that take no JSON (a multipart transcription, a form post) are
    forwarded as they are, not read as JSON; one upstream serving every model answers them."""
    rec, up = await recording(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url_of(proxy) + "/v1/audio/transcriptions",
            data=b"not json at all",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as r,
    ):
        assert r.status == 200
    assert rec.seen == [
        ("/v1/audio/transcriptions", "application/x-www-form-urlencoded", b"not json at all")
    ]


@pytest.mark.parametrize(("ready_when", "status"), [(None, 200), ("any", 200), ("all", 503)])
async def test_readyz_with_one_upstream_up_and_one_down_follows_ready_when(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    ready_when: str | None,
    status: int,
) -> None:
    """Default ``any``: a node behind a load balancer can serve while one upstream answers;
    ``all``: every upstream must answer. The body lists each upstream's state either way."""
    _, up = await recording(aiohttp_server)
    sections: dict[str, Any] = {
        "upstreams": [
            {"name": "up", "url": url_of(up), "models": ["a"]},
            {"name": "down", "url": f"http://127.0.0.1:{free_port()}", "models": ["b"]},
        ]
    }
    if ready_when is not None:
        sections["health"] = {"ready_when": ready_when}
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path, **sections))
    async with aiohttp.ClientSession() as s, s.get(url_of(proxy) + "/readyz") as r:
        doc = await r.json()
    assert r.status == status
    assert doc["ready"] is (status == 200)
    assert doc["upstreams"] == {"up": True, "down": False}
    assert doc["ready_when"] == (ready_when or "any")


async def test_prefixes_match_whole_path_segments(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A ``/generate`` prefix takes ``/generate`` and ``/generate/...``, never
    ``/generate_stream``: that goes to the upstream with the next longest prefix."""
    only_generate, up_a = await recording(aiohttp_server)
    rest, up_b = await recording(aiohttp_server)
    cfg = proxy_config(
        url_of(up_a),
        tmp_path,
        upstreams=[
            {"name": "generate", "url": url_of(up_a), "prefix": "/generate", "api": "tgi"},
            {"name": "rest", "url": url_of(up_b), "prefix": "/", "api": "tgi"},
        ],
    )
    proxy, _ = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for path in ("/generate", "/generate/", "/generate_stream", "/generatex"):
            async with s.post(url_of(proxy) + path, json={"inputs": "x"}) as r:
                assert r.status == 200
    assert [p for p, _, _ in only_generate.seen] == ["/generate", "/generate/"]
    assert [p for p, _, _ in rest.seen] == ["/generate_stream", "/generatex"]
