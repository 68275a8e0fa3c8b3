"""Hostile and malformed input: a clear error, never a crash, never a request the proxy did not
mean to send. Real sockets on 127.0.0.1; raw bytes where a well-behaved client library would
refuse to send them. Every test asserts on what the upstream received."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.standins import StandIn
from proxy.usage import RequestPlan, StreamUsage, Usage
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.logs import no_tracebacks
from tests.helpers.raw_http import raw_exchange
from tests.helpers.recording_upstream import recorder_server, still_serves
from tests.helpers.through_proxy import final_record

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def two_upstreams(url: str, tmp_path: Path, **sections: Any) -> Any:
    return proxy_config(
        url,
        tmp_path,
        upstreams=[
            {"name": "a", "url": url, "models": ["m"]},
            {"name": "b", "url": url, "models": ["other-*"]},
        ],
        **sections,
    )


# -- bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"model": "m", "messages": [', id="truncated-json"),
        pytest.param(b'{"model": "m\xff\xfe", "messages": []}', id="invalid-utf8"),
    ],
)
async def test_unparsable_json_is_forwarded_untouched_when_the_upstream_decides(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, body: bytes
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url_of(proxy) + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        assert r.status == 200  # the one upstream said so
    assert [x.body for x in rec.seen] == [body]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"model": "m", "messages": [', id="truncated-json"),
        pytest.param(b'{"model": "m\xff\xfe", "messages": []}', id="invalid-utf8"),
        pytest.param(b"\x00\x01garbage", id="binary"),
    ],
)
async def test_unparsable_json_is_400_when_routing_needs_the_model(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    body: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(two_upstreams(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url_of(proxy) + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        assert r.status == 400
        err = (await r.json())["error"]
        assert err["type"] == "invalid_request_error"
        assert "not valid JSON" in err["message"]
        assert r.headers["X-Request-Id"]
    assert rec.seen == []
    no_tracebacks(caplog)
    await still_serves(url_of(proxy))


async def test_model_no_upstream_serves_is_404_openai_style(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(two_upstreams(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "model": "gpt-x"}) as r,
    ):
        assert r.status == 404
        doc = await r.json()
    assert doc["error"]["type"] == "not_found_error"
    assert doc["error"]["code"] == "model_not_found"
    assert "gpt-x" in doc["error"]["message"]
    assert rec.seen == []


async def test_body_over_the_limit_with_content_length_is_413_before_reading(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path, limits={"max_body_bytes": 1024}))
    big = json.dumps({**CHAT, "pad": "x" * 4096}).encode()
    # only the head is sent: the refusal must not wait for a body that never comes
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(big)
    )
    resp = await raw_exchange(proxy.port, head)
    assert resp.status == 413
    assert json.loads(resp.body)["error"]["type"] == "invalid_request_error"
    assert rec.seen == []
    await still_serves(url_of(proxy))


async def trickle(data: bytes, piece: int = 512) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]
        await asyncio.sleep(0)


async def test_chunked_json_body_over_the_limit_is_413_and_never_sent(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path, limits={"max_body_bytes": 1024}))
    big = json.dumps({**CHAT, "pad": "x" * 8192}).encode()
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url_of(proxy) + "/v1/chat/completions",
            data=trickle(big),  # no Content-Length: chunked
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert r.status == 413
    assert rec.seen == []
    await still_serves(url_of(proxy))


async def test_streamed_body_over_the_limit_is_413_and_cut_short_upstream(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A non-JSON body streams through as it arrives, counted on its way: past the limit the
    upstream's request breaks off (it never sees a complete request) and the client gets 413."""
    rec, up = await recorder_server(aiohttp_server)
    limit = 4096
    proxy, _ = await make_proxy(
        proxy_config(url_of(up), tmp_path, limits={"max_body_bytes": limit})
    )
    big = b"\x01" * (64 * 1024)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url_of(proxy) + "/v1/upload",
            data=trickle(big),
            headers={"Content-Type": "application/octet-stream"},
        ) as r,
    ):
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "invalid_request_error"
    deadline = asyncio.get_running_loop().time() + 5
    while not rec.seen and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert all(not x.complete for x in rec.seen)
    assert all(len(x.body) <= limit for x in rec.seen)
    await still_serves(url_of(proxy))


# -- heads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"X-Long: " + b"a" * 9000 + b"\r\n", id="header-too-long"),
        pytest.param(b"".join(b"X-H%d: 1\r\n" % i for i in range(300)), id="too-many-headers"),
        pytest.param(b"X-Bad\x01Name: 1\r\n", id="bad-header-name"),
    ],
)
async def test_oversized_or_malformed_heads_are_400_without_traceback(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    head: bytes,
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    caplog.set_level(logging.DEBUG)
    resp = await raw_exchange(
        proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n"
    )
    assert resp.status in (400, 431)
    assert resp.closed
    assert rec.seen == []
    no_tracebacks(caplog)
    assert any("refused a malformed request" in r.getMessage() for r in caplog.records)
    await still_serves(url_of(proxy))


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        pytest.param(
            b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            "absolute-form",
            id="absolute-uri",
        ),
        pytest.param(
            b"GET http://127.0.0.1:1/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "absolute-form",
            id="absolute-uri-loopback",
        ),
        pytest.param(
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
            "CONNECT",
            id="connect",
        ),
        pytest.param(
            b"GET /v1/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", "traversal", id="dotdot"
        ),
        pytest.param(
            b"GET /v1/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n", "traversal", id="enc-dotdot"
        ),
        pytest.param(b"GET /v1/./models HTTP/1.1\r\nHost: x\r\n\r\n", "traversal", id="dot"),
        pytest.param(
            b"GET /v1%2Fmodels HTTP/1.1\r\nHost: x\r\n\r\n", "encoded slashes", id="enc-slash"
        ),
        pytest.param(
            b"GET /v1%5cmodels HTTP/1.1\r\nHost: x\r\n\r\n", "encoded slashes", id="enc-bslash"
        ),
        pytest.param(
            b"GET //evil.example/x HTTP/1.1\r\nHost: x\r\n\r\n", "absolute-form", id="dbl-slash"
        ),
    ],
)
async def test_targets_outside_the_upstream_are_refused(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    request_bytes: bytes,
    message: str,
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    resp = await raw_exchange(proxy.port, request_bytes)
    assert resp.status == 400
    err = json.loads(resp.body)["error"]
    assert err["type"] == "invalid_request_error"
    assert message in err["message"]
    assert rec.seen == []
    await still_serves(url_of(proxy))


async def test_host_header_never_picks_the_destination(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    resp = await raw_exchange(
        proxy.port,
        b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-Host: evil.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert resp.status == 200
    assert len(rec.seen) == 1
    assert rec.seen[0].headers["host"] == f"127.0.0.1:{up.port}"


# -- smuggling -------------------------------------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
            id="CL.TE",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 40\r\n\r\n0\r\n\r\n" + SMUGGLED,
            id="TE.CL",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
            id="CL.CL-differ",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Content-Length: 2\r\n\r\nok" + SMUGGLED,
            id="CL.CL-same",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
            + SMUGGLED,
            id="TE-obfuscated",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n"
            b"Content-Length: 3\r\n\r\nabc" + SMUGGLED,
            id="TE-space",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
            id="TE.TE",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello" + SMUGGLED,
            id="CL-sign",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;x=\x00\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
            id="chunk-ext-nul",
        ),
        pytest.param(
            b"POST /v1/upload HTTP/1.1\nHost: x\nContent-Length: 5\n\nhello" + SMUGGLED,
            id="bare-LF",
        ),
    ],
)
async def test_smuggling_attempts_are_refused_and_nothing_reaches_the_upstream(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    resp = await raw_exchange(proxy.port, request_bytes)
    assert resp.status == 400
    assert resp.closed  # the connection is gone: the tail is never read as a request
    await asyncio.sleep(0.1)
    assert [x.raw_path for x in rec.seen] == []
    no_tracebacks(caplog)
    await still_serves(url_of(proxy))
    assert "/smuggled" not in [x.raw_path for x in rec.seen]


async def test_request_bytes_inside_a_chunked_body_stay_body(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The proxy re-frames every request: a body that looks like a request reaches the upstream
    as body bytes of one request, never as a second request."""
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    payload = b"0\r\n\r\n" + SMUGGLED
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    resp = await raw_exchange(
        proxy.port,
        b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked,
    )
    assert resp.status == 200
    assert [(x.method, x.raw_path, x.body) for x in rec.seen] == [("POST", "/v1/upload", payload)]


async def test_pipelined_requests_are_forwarded_one_by_one(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Two well-formed pipelined requests are two upstream requests, each with its own id."""
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"GET /v1/a HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/b HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n"
        )
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert [x.raw_path for x in rec.seen] == ["/v1/a", "/v1/b"]
    ids = {x.headers["x-request-id"] for x in rec.seen}
    assert len(ids) == 2


# -- bodies the usage parsers choke on --------------------------------------------------------


async def test_a_body_that_trips_the_usage_parser_is_forwarded_not_500(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Valid JSON of unexpected shapes (``messages`` a number) reaches the upstream untouched;
    it decides, and the request has its record."""
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    odd = [
        {"model": "m", "messages": 1},
        {"model": "m", "messages": [1, None, {"content": 5}], "prompt": {"x": 1}},
        {"model": "m", "stream": "yes", "stream_options": 3, "max_tokens": "many"},
        [1, 2, 3],
    ]
    async with aiohttp.ClientSession() as s:
        for doc in odd:
            async with s.post(url_of(proxy) + "/v1/chat/completions", json=doc) as r:
                assert r.status == 200, await r.text()
                rid = r.headers["X-Request-Id"]
            record = await final_record(url_of(proxy), rid)
            assert record["status"] == 200
    assert [json.loads(x.body) for x in rec.seen] == odd
    assert all(r.levelno < logging.ERROR for r in caplog.records)


async def test_an_answer_that_trips_the_usage_parser_is_relayed_and_recorded(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    answers = [b'{"choices": 5, "output": 1}', b'{"usage": {"prompt_tokens": "x"}}', b"[]"]

    async def odd(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answers[int(request.query["i"])], content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", odd)
    up = await aiohttp_server(app)
    proxy, parts = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with aiohttp.ClientSession() as s:
        for i, answer in enumerate(answers):
            async with s.post(f"{url_of(proxy)}/v1/chat/completions?i={i}", json=CHAT) as r:
                assert await r.read() == answer
                rid = r.headers["X-Request-Id"]
            record = await final_record(url_of(proxy), rid)
            assert record["outcome"] == "ok"
    assert parts.accountant.requests == {}  # nothing left open


async def test_a_usage_parser_bug_never_breaks_the_stream(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth at the boundary: whatever a parser raises, the client gets the
    upstream's bytes and the request gets a record."""
    from proxy import usage

    class Broken(StreamUsage):
        def __init__(self) -> None:
            self.fed = 0

        def feed(self, chunk: bytes) -> bytes:
            self.fed += 1
            if self.fed > 1:
                raise RuntimeError("parser bug")
            return chunk

        def finish(self) -> Usage:
            raise RuntimeError("parser bug")

    def broken_stream(path: str, ctype: str, plan: RequestPlan, collect: bool) -> Broken:
        return Broken()

    def broken_headers(path: str, headers: Any) -> Usage:
        raise RuntimeError("parser bug")

    real = usage.APIS["openai"]
    monkeypatch.setitem(
        usage.APIS,
        "openai",
        usage.ApiUsage(real.plan, broken_stream, real.body, broken_headers),
    )
    standin = StandIn(flavor="vllm", scale=0.0)
    up = await aiohttp_server(standin.app())
    proxy, parts = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        got = await r.read()
        rid = r.headers["X-Request-Id"]
    assert got.endswith(b"data: [DONE]\n\n")
    assert got.count(b"data: ") == 16 + 3  # role, 16 words, usage, [DONE]
    record = await final_record(url_of(proxy), rid)
    assert record["outcome"] == "ok"
    assert parts.accountant.requests == {}
