"""Failures reach the client as failures, and each timeout is the one that fired.

Found with real servers (issue 12): a stream whose upstream broke off ended as a clean 200, an
upstream 5xx was recorded ``ok``, aiohttp's own parse errors were plain text quoting the bad
line, the first-byte timer was cut short by the idle timer and started before a slow upload
had been sent. Real sockets on 127.0.0.1 throughout."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.logs import no_tracebacks
from tests.helpers.raw_http import raw_exchange
from tests.helpers.recording_upstream import recorder_server, still_serves
from tests.helpers.service import listen, running
from tests.helpers.through_proxy import CHAT, final_record

FIRST_EVENTS = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'
)


def one_upstream(url: str, tmp_path: Path, **timeouts: float) -> Any:
    return proxy_config(
        url, tmp_path, upstreams=[{"name": "llm", "url": url, "timeouts": timeouts}]
    )


async def raw_stream_then(action: str) -> asyncio.Server:
    """An upstream speaking raw HTTP/1.1: SSE headers and two events, then ``action``:
    ``reset`` (RST mid-body), ``close`` (FIN mid-body, chunked never terminated), ``stall``,
    or ``short`` (a Content-Length body cut short)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if action == "short":
            body = json.dumps({"choices": [], "usage": {"total_tokens": 1}}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(body) + 50) + body
            )
            await writer.drain()
            writer.close()
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(FIRST_EVENTS)
            + FIRST_EVENTS
            + b"\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        if action == "reset":
            writer.transport.abort()
        elif action == "close":
            writer.close()
        else:
            await asyncio.sleep(30)

    return await asyncio.start_server(serve, "127.0.0.1", 0)


# -- an upstream that breaks off mid-stream aborts the client's connection --------------------


@pytest.mark.parametrize(
    ("action", "outcome"),
    [("reset", "upstream_reset"), ("close", "upstream_reset"), ("stall", "upstream_timeout")],
)
async def test_a_broken_stream_is_an_error_for_the_client_not_a_clean_end(
    make_proxy: ProxyFactory, tmp_path: Path, action: str, outcome: str
) -> None:
    server = await raw_stream_then(action)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        proxy, _ = await make_proxy(one_upstream(url, tmp_path, idle_s=0.5))
        async with aiohttp.ClientSession() as s:
            r = await s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True})
            assert r.status == 200
            rid = r.headers["X-Request-Id"]
            got = await r.content.readexactly(len(FIRST_EVENTS))  # relayed as it came
            with pytest.raises(aiohttp.ClientPayloadError):  # what curl reports as exit 18
                await r.read()
            r.release()
        assert got == FIRST_EVENTS
        rec = await final_record(url_of(proxy), rid)
        assert rec["outcome"] == outcome
        assert rec["completion_tokens"] == 1
    finally:
        server.close()


async def test_a_body_cut_short_of_its_content_length_is_an_error_for_the_client(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    server = await raw_stream_then("short")
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        proxy, _ = await make_proxy(one_upstream(url, tmp_path))
        async with aiohttp.ClientSession() as s:
            r = await s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT)
            assert r.status == 200
            rid = r.headers["X-Request-Id"]
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
            r.release()
        rec = await final_record(url_of(proxy), rid)
        assert rec["outcome"] == "upstream_reset"
    finally:
        server.close()


# -- an upstream error answer is recorded as one -----------------------------------------------


@pytest.mark.parametrize("status", [500, 503])
async def test_an_upstream_5xx_is_relayed_and_recorded_as_upstream_error(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, status: int
) -> None:
    async def fail(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": {"message": "engine dead"}}, status=status)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", fail)
    up: TestServer = await aiohttp_server(app)
    proxy, parts = await make_proxy(one_upstream(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == status
        assert (await r.json())["error"]["message"] == "engine dead"  # untouched
        rid = r.headers["X-Request-Id"]
    rec = await final_record(url_of(proxy), rid)
    assert rec["outcome"] == "upstream_error"
    assert rec["status"] == status
    outcomes = parts.metrics.registry.get_sample_value(
        "wattproxy_request_outcomes_total", {"upstream": "llm", "outcome": "upstream_error"}
    )
    assert outcomes == 1.0


# -- what aiohttp's parser refuses is answered in the proxy's JSON shape ------------------------

SECRET = b"sk-planted-secret-0123456789"


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Content-Length: 3" + SECRET + b"\r\n\r\nok",
            id="duplicate-content-length",
        ),
        pytest.param(
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\nX-Key: " + SECRET + b"\r\n\r\n0\r\n\r\n",
            id="content-length-with-chunked",
        ),
        pytest.param(
            b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Long: " + SECRET + b"a" * 9000 + b"\r\n\r\n",
            id="header-too-long",
        ),
        pytest.param(
            b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Bad\x01Name: " + SECRET + b"\r\n\r\n",
            id="bad-header-name",
        ),
    ],
)
async def test_parse_errors_are_json_with_a_request_id_and_quote_nothing(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    caplog.set_level(logging.DEBUG)
    resp = await raw_exchange(proxy.port, request_bytes)
    assert resp.status in (400, 431)
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-request-id"]
    assert resp.closed
    err = json.loads(resp.body)["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"]
    assert SECRET not in resp.body
    assert SECRET.decode() not in caplog.text
    assert rec.seen == []
    no_tracebacks(caplog)
    await still_serves(url_of(proxy))


async def test_parse_errors_are_json_under_the_production_runner_too(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    async with running(proxy_config(url_of(up), tmp_path, listen=listen())) as svc:
        resp = await raw_exchange(
            svc.port,
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        )
    assert resp.status == 400
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-request-id"]
    assert json.loads(resp.body)["error"]["type"] == "invalid_request_error"
    assert rec.seen == []


async def test_options_asterisk_gets_its_own_clear_answer(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    resp = await raw_exchange(proxy.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 501
    err = json.loads(resp.body)["error"]
    assert "absolute-form" not in err["message"]
    assert "OPTIONS *" in err["message"]
    assert rec.seen == []


@pytest.mark.parametrize(
    "coding", [b"gzip, chunked", b"deflate,chunked", b"br, chunked", b"x-custom, chunked"]
)
async def test_transfer_codings_other_than_chunked_are_refused_with_501(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, coding: bytes
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    resp = await raw_exchange(
        proxy.port,
        b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
        + coding
        + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    assert resp.status == 501
    assert resp.closed
    err = json.loads(resp.body)["error"]
    assert "Transfer-Encoding" in err["message"]
    assert resp.headers["x-request-id"]
    assert rec.seen == []


# -- timeouts: each phase has its own, and the message names it ----------------------------------


class SlowHeaders:
    """An upstream that thinks ``think_s`` before its response headers (image generation)."""

    def __init__(self, think_s: float) -> None:
        self.think_s = think_s

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_post("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(self.think_s)
        return web.json_response(
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "bytes": len(body),
            }
        )


async def test_first_byte_timeout_is_not_cut_short_by_the_idle_timeout(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    up = await aiohttp_server(SlowHeaders(1.0).app())
    proxy, _ = await make_proxy(one_upstream(url_of(up), tmp_path, first_byte_s=5, idle_s=0.3))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 200
        assert (await r.json())["usage"]["total_tokens"] == 2


async def test_a_hanging_upstream_is_504_after_first_byte_s_and_the_message_names_it(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    up = await aiohttp_server(SlowHeaders(10.0).app())
    proxy, _ = await make_proxy(one_upstream(url_of(up), tmp_path, first_byte_s=1.0, idle_s=0.3))
    start = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 504
        message = (await r.json())["error"]["message"]
    took = time.monotonic() - start
    assert 0.9 < took < 5
    assert "within 1 s" in message
    assert "timeouts.first_byte_s" in message


async def _slow_upload(port: int, path: str, pieces: int, gap_s: float) -> bytes:
    """A chunked octet-stream upload of ``pieces`` chunks, ``gap_s`` apart; the raw answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        for _ in range(pieces):
            writer.write(b"4\r\nzzzz\r\n")
            await writer.drain()
            await asyncio.sleep(gap_s)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_first_byte_timer_starts_once_the_body_is_sent(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """A 1.2 s upload with first_byte_s 0.5 is served: the upstream cannot answer a body it
    has not got, so its timer starts when the body is through."""
    up = await aiohttp_server(SlowHeaders(0.1).app())
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        listen=listen(read_timeout_s=5),
        upstreams=[{"name": "llm", "url": url_of(up), "timeouts": {"first_byte_s": 0.5}}],
    )
    async with running(cfg) as svc:
        answer = await _slow_upload(svc.port, "/v1/upload", pieces=6, gap_s=0.2)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


async def test_a_slow_upload_is_the_clients_408_not_the_upstreams_504(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    up = await aiohttp_server(SlowHeaders(0.1).app())
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        listen=listen(read_timeout_s=0.8),
        upstreams=[{"name": "llm", "url": url_of(up), "timeouts": {"first_byte_s": 0.3}}],
    )
    async with running(cfg) as svc:
        answer = await _slow_upload(svc.port, "/v1/upload", pieces=8, gap_s=0.2)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"request_timeout" in body


async def test_an_idle_upstream_is_logged_naming_idle_s(
    make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await raw_stream_then("stall")
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        proxy, _ = await make_proxy(one_upstream(url, tmp_path, idle_s=0.4))
        caplog.set_level(logging.INFO, logger="wattproxy")
        async with aiohttp.ClientSession() as s:
            r = await s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True})
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
            r.release()
        assert "timeouts.idle_s" in caplog.text
        assert "0.4 s" in caplog.text
    finally:
        server.close()
