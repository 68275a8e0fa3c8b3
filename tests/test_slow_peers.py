"""Slow and vanished peers: slow-loris clients are cut off after ``listen.read_timeout_s``,
clients that stop reading hold back the upstream instead of filling memory, clients that leave
cancel the upstream request, and upstreams that stall end in a timeout with a record.

Some tests run the proxy as production does (``proxy.server.Service``: the same runner
settings as ``wattproxy serve``), the rest through the ``make_proxy`` test server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.recording_upstream import recorder_server
from tests.helpers.service import READ_TIMEOUT_S, listen, running
from tests.helpers.through_proxy import CHAT, final_record


async def closed_after(reader: asyncio.StreamReader, limit_s: float) -> float:
    """Seconds until the peer closes the connection (reading whatever it sends)."""
    start = time.monotonic()
    async with asyncio.timeout(limit_s):
        while await reader.read(4096):
            pass
    return time.monotonic() - start


# -- slow-loris ------------------------------------------------------------------------------


async def test_slow_headers_are_cut_off_after_read_timeout(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    async with running(proxy_config(url_of(up), tmp_path, listen=listen())) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"
        start = time.monotonic()
        closed = asyncio.ensure_future(closed_after(reader, 10))
        sent = 0
        with contextlib.suppress(ConnectionError):
            for byte in head:  # one byte every 50 ms: the head would take 12 s
                if closed.done() or time.monotonic() - start > 5:
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)
        await asyncio.wait_for(closed, 5)
        cut_after = time.monotonic() - start
        writer.close()
        assert sent < len(head), "the proxy read the whole slow head"
        assert READ_TIMEOUT_S * 0.8 <= cut_after <= READ_TIMEOUT_S + 2.0
        # an idle connection that never sends a byte is closed too
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        idle = await closed_after(reader, READ_TIMEOUT_S + 3)
        writer.close()
        assert idle >= READ_TIMEOUT_S * 0.8
        # and the proxy still serves
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{svc.port}/v1/m") as r:
            assert r.status == 200
    assert [x.raw_path for x in rec.seen] == ["/v1/m"]


async def test_keep_alive_request_heads_get_a_fresh_read_timeout(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """The timeout bounds one request head, not a connection: a client that sends requests
    in time keeps its connection for longer than ``read_timeout_s``."""
    rec, up = await recorder_server(aiohttp_server)
    connects: list[object] = []

    async def on_connect(*args: object) -> None:
        connects.append(args)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connect)
    async with (
        running(proxy_config(url_of(up), tmp_path, listen=listen())) as svc,
        aiohttp.ClientSession(trace_configs=[trace]) as s,
    ):
        for _ in range(4):
            async with s.get(f"http://127.0.0.1:{svc.port}/v1/m") as r:
                assert r.status == 200
                await r.read()
            await asyncio.sleep(READ_TIMEOUT_S / 3)
    assert len(connects) == 1  # one connection for ~READ_TIMEOUT_S * 1.3 s
    assert len(rec.seen) == 4


async def _trickled_body_request(port: int, path: str, ctype: str, body: bytes) -> bytes:
    """Send the head, then the body one byte every 100 ms; return what the proxy answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    answer = bytearray()

    async def read_all() -> None:
        while chunk := await reader.read(4096):
            answer.extend(chunk)

    def answered() -> bool:
        head, sep, rest = answer.partition(b"\r\n\r\n")
        size = next(
            (
                int(v)
                for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                if k.strip().lower() == b"content-length"
            ),
            None,
        )
        return bool(sep) and size is not None and len(rest) >= size

    reading = asyncio.ensure_future(read_all())
    try:
        deadline = time.monotonic() + 10
        for byte in body:
            if answered() or reading.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.sleep(0.1)
        while not answered() and not reading.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        reading.cancel()
        writer.close()
    return bytes(answer)


async def test_trickled_json_body_is_408_and_never_forwarded(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    async with running(proxy_config(url_of(up), tmp_path, listen=listen())) as svc:
        start = time.monotonic()
        answer = await _trickled_body_request(
            svc.port, "/v1/chat/completions", "application/json", json.dumps(CHAT).encode()
        )
        took = time.monotonic() - start
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["type"] == "request_timeout"
    assert took < READ_TIMEOUT_S + 2.0
    assert rec.seen == []


async def test_trickled_streamed_body_is_408_and_cut_short_upstream(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    rec, up = await recorder_server(aiohttp_server)
    async with running(proxy_config(url_of(up), tmp_path, listen=listen())) as svc:
        answer = await _trickled_body_request(
            svc.port, "/v1/upload", "application/octet-stream", b"z" * 100
        )
        base = f"http://127.0.0.1:{svc.port}"
        async with aiohttp.ClientSession() as s, s.post(base + "/v1/x", json=CHAT) as r:
            assert r.status == 200  # still serving
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["type"] == "request_timeout"
    uploads = [x for x in rec.seen if x.raw_path == "/v1/upload"]
    assert all(not x.complete and len(x.body) < 100 for x in uploads)


# -- clients that stop reading or leave -------------------------------------------------------


class Firehose:
    """An upstream that streams SSE events as fast as the proxy takes them, counting bytes."""

    EVENT = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 16000}}]}).encode()

    def __init__(self) -> None:
        self.written = 0
        self.stopped = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.stream)
        return app

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        event = self.EVENT + b"\n\n"
        try:
            for _ in range(100_000):  # ~1.6 GB: far more than any buffer on the way
                await resp.write(event)
                self.written += len(event)
        except (ConnectionError, asyncio.CancelledError):
            self.stopped.set()
            raise
        return resp


async def test_a_client_that_stops_reading_holds_back_the_upstream(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Backpressure end to end: while the client reads nothing, the upstream's writes block
    once the (bounded) buffers on the way are full; the proxy holds no growing backlog."""
    hose = Firehose()
    up = await aiohttp_server(hose.app())
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps({**CHAT, "stream": True}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    rid = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    # the client now reads nothing; wait until the upstream stops making progress
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() - stable_since < 0.5:
        assert time.monotonic() < deadline, f"upstream never blocked ({hose.written} bytes)"
        if hose.written != last:
            last, stable_since = hose.written, time.monotonic()
        await asyncio.sleep(0.05)
    in_flight = hose.written
    # socket buffers on loopback (a few MiB each way) plus the proxy's small read and write
    # buffers: far below what an unbounded proxy would have taken by now
    assert in_flight < 48 * 1024 * 1024, in_flight
    await asyncio.sleep(0.5)
    assert hose.written == in_flight  # still blocked, not creeping
    # the client leaves: the upstream request is cancelled, the record says so
    writer.close()
    await asyncio.wait_for(hose.stopped.wait(), 5)
    rec = await final_record(url_of(proxy), rid)
    assert rec["outcome"] == "client_disconnect"
    assert rec["completion_tokens"] and rec["completion_tokens"] > 0


class Thinker:
    """An upstream that takes its time before answering, and notes being cancelled."""

    def __init__(self, think_s: float = 10.0) -> None:
        self.think_s = think_s
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.answer)
        return app

    async def answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.started.set()
        try:
            await asyncio.sleep(self.think_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return web.json_response({"choices": []})


async def test_client_gone_while_upstream_thinks_cancels_the_upstream_request(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    thinker = Thinker()
    up = await aiohttp_server(thinker.app())
    # the client leaves before any answer: the record is found by the id it sent, trusted
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        listen=listen(read_timeout_s=30),
        identity={"trust_request_id": True},
    )
    async with running(cfg) as svc:
        base = f"http://127.0.0.1:{svc.port}"
        s = aiohttp.ClientSession()
        try:
            req = asyncio.ensure_future(
                s.post(base + "/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "gone-1"})
            )
            await asyncio.wait_for(thinker.started.wait(), 5)
            req.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await req
        finally:
            await s.close()
        await asyncio.wait_for(thinker.cancelled.wait(), 5)
        rec = await final_record(base, "gone-1")
    assert rec["outcome"] == "client_disconnect"


# -- upstreams that stall ---------------------------------------------------------------------


@contextlib.contextmanager
def unaccepting_port() -> Any:
    """A port whose listener never accepts and whose backlog is full: connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.05)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        listener.close()


async def test_connect_timeout_is_504(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    with unaccepting_port() as port:
        url = f"http://127.0.0.1:{port}"
        cfg = proxy_config(
            url, tmp_path, upstreams=[{"name": "llm", "url": url, "timeouts": {"connect_s": 0.3}}]
        )
        proxy, _ = await make_proxy(cfg)
        start = time.monotonic()
        async with (
            aiohttp.ClientSession() as s,
            s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 504
            err = (await r.json())["error"]
            rid = r.headers["X-Request-Id"]
        assert time.monotonic() - start < 3
    assert err["type"] == "upstream_timeout"
    assert "connection within 0.3 s" in err["message"]
    rec = await final_record(url_of(proxy), rid)
    assert rec["outcome"] == "upstream_timeout"
    assert rec["status"] == 504


async def test_first_byte_timeout_is_504_with_a_record(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    thinker = Thinker()
    up = await aiohttp_server(thinker.app())
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        upstreams=[{"name": "llm", "url": url_of(up), "timeouts": {"first_byte_s": 0.3}}],
    )
    proxy, _ = await make_proxy(cfg)
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 504
        assert "within 0.3 s" in (await r.json())["error"]["message"]
        rid = r.headers["X-Request-Id"]
    await asyncio.wait_for(thinker.cancelled.wait(), 5)  # the upstream request was dropped
    rec = await final_record(url_of(proxy), rid)
    assert rec["outcome"] == "upstream_timeout"


async def test_upstream_idle_mid_stream_aborts_the_clients_stream(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    first = (
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'
    )

    async def stall(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(first)
        await asyncio.sleep(10)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stall)
    up: TestServer = await aiohttp_server(app)
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        upstreams=[{"name": "llm", "url": url_of(up), "timeouts": {"idle_s": 0.4}}],
    )
    proxy, _ = await make_proxy(cfg)
    start = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        assert r.status == 200
        got = await r.content.readexactly(len(first))
        with pytest.raises(aiohttp.ClientPayloadError):  # cut off, not passed off as whole
            await r.read()
        rid = r.headers["X-Request-Id"]
    assert got == first
    assert time.monotonic() - start < 3
    rec = await final_record(url_of(proxy), rid)
    assert rec["outcome"] == "upstream_timeout"
    assert rec["completion_tokens"] == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_that_closes_without_answering_is_502(
    make_proxy: ProxyFactory, tmp_path: Path, stream: bool
) -> None:
    """An upstream that accepts and closes at once (a crashed worker)."""

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy, _ = await make_proxy(proxy_config(f"http://127.0.0.1:{port}", tmp_path))
        async with (
            aiohttp.ClientSession() as s,
            s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": stream}) as r,
        ):
            assert r.status == 502
            assert (await r.json())["error"]["type"] == "upstream_error"
            rid = r.headers["X-Request-Id"]
        rec = await final_record(url_of(proxy), rid)
        assert rec["outcome"] == "upstream_unavailable"
    finally:
        server.close()
        await server.wait_closed()
