"""Small load clients that wrk cannot be: time to the first streamed byte, and thousands of
streams held open at once. Both speak plain HTTP/1.1 over sockets to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.wrk import PATH, request_body

HOST = "127.0.0.1"
#: The end of a chunked body.
LAST_CHUNK = b"0\r\n\r\n"
#: Seconds one request of the time-to-first-byte client may take.
REQUEST_TIMEOUT_S = 10.0


def http_request(port: int, body: bytes) -> bytes:
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class StreamClient:
    """One keep-alive connection that sends streaming requests and times the first event."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.request = http_request(port, request_body(stream=True))
        self.sock = socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def first_event_s(self) -> float:
        """Seconds from sending the request to the first byte of the first SSE event; reads
        the rest of the stream so the connection can be reused."""
        sock = self.sock
        buf = b""
        t0 = time.perf_counter()
        sock.sendall(self.request)
        first = 0.0
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf += data
            if not first:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0 and b"data:" in buf[head_end:]:
                    first = time.perf_counter() - t0
            if first and buf.endswith(LAST_CHUNK):
                return first

    def close(self) -> None:
        self.sock.close()


def time_to_first_event(
    ports: dict[str, int], requests: int, rounds: int
) -> dict[str, list[float]]:
    """Per target, ``requests`` timings in seconds, taken in ``rounds`` interleaved blocks."""
    out: dict[str, list[float]] = {name: [] for name in ports}
    clients = {name: StreamClient(port) for name, port in ports.items()}
    try:
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for name, client in clients.items():
                for _ in range(per_round):
                    out[name].append(client.first_event_s())
    finally:
        for client in clients.values():
            client.close()
    return out


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (like ``ulimit -n``); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Held:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def _open_one(port: int, request: bytes, timeout_s: float) -> Held:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(request)
            buf = b""
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0 and b"data:" in buf[head_end:]:
                    return Held(reader, writer)
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed before the first event")
                buf += data
    except BaseException:
        writer.close()
        raise


async def open_streams(
    port: int, count: int, batch: int = 100, timeout_s: float = 60.0
) -> tuple[list[Held], int]:
    """Open ``count`` streams that the upstream holds after their first event, ``batch`` at a
    time. Returns the streams and how many failed to open."""
    request = http_request(port, request_body(stream=True, model="hold"))
    held: list[Held] = []
    failed = 0
    for start in range(0, count, batch):
        results = await asyncio.gather(
            *(_open_one(port, request, timeout_s) for _ in range(min(batch, count - start))),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, Held):
                held.append(r)
            else:
                failed += 1
    return held, failed


async def _finish_one(h: Held, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            tail = b""
            while not tail.endswith(LAST_CHUNK):
                data = await h.reader.read(65536)
                if not data:
                    return False
                tail = (tail + data)[-16:]
            return True
    except (TimeoutError, ConnectionError):
        return False
    finally:
        h.writer.close()


async def finish_streams(held: Sequence[Held], timeout_s: float = 60.0) -> int:
    """Read every held stream to its end and close it; returns how many ended cleanly."""
    results = await asyncio.gather(*(_finish_one(h, timeout_s) for h in held))
    return sum(results)


async def drop_streams(held: Sequence[Held]) -> None:
    """Close every held stream without reading on (clients that went away)."""
    for h in held:
        h.writer.close()
    await asyncio.sleep(0)
