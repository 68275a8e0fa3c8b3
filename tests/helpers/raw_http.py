"""One HTTP exchange over a raw socket: the exact bytes a test sends (malformed, smuggled,
pipelined), the response read back, and whether the peer then closed the connection."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the proxy closed the connection after answering


async def raw_exchange(port: int, data: bytes, timeout_s: float = 5.0) -> RawResponse:
    """Send ``data`` as is, read one response, and tell whether the connection then closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            async with asyncio.timeout(0.25):
                rest = await reader.read()
            closed = rest == b""
        except TimeoutError:
            closed = False
        return RawResponse(status, headers, body, closed)
    finally:
        writer.close()
