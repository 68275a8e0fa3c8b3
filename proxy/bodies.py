"""Reading a client's request body within the proxy's limits: no more than
``limits.max_body_bytes`` (413), no longer than ``listen.read_timeout_s`` (408, the slow-loris
guard for bodies), whether it is read whole (a JSON body, to route and plan it) or streams
through to the upstream as it arrives (an upload)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.errors import PayloadTooLarge, RequestTimeout
from proxy.usage.base import UploadProbe

#: Methods whose request may carry a body the proxy reads or streams.
BODY_METHODS = frozenset(("POST", "PUT", "PATCH", "DELETE"))


def is_json(content_type: str) -> bool:
    """Whether a (lower-case, parameter-free) Content-Type names JSON."""
    return content_type == "application/json" or content_type.endswith("+json")


async def body_chunks(
    request: web.Request, limit: int, timeout_s: float | None
) -> AsyncIterator[bytes]:
    """The request body as it arrives: refused once it passes ``limit`` bytes, or when the
    whole body has not arrived ``timeout_s`` seconds after the first read (slow-loris guard)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    size = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await request.content.readany()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {timeout_s:g} s"
            ) from None
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        yield chunk


async def read_limited(request: web.Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout_s`` seconds."""
    length = request.content_length
    if length is not None and length <= limit:
        # the body cannot outgrow its Content-Length: one read under one deadline (a timeout
        # context per chunk costs more than the read of a small body)
        try:
            async with asyncio.timeout(timeout_s):
                return await request.content.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {timeout_s:g} s"
            ) from None
    return b"".join([chunk async for chunk in body_chunks(request, limit, timeout_s)])


async def armed_when_sent(
    body: AsyncIterator[bytes], timer: asyncio.Timeout, first_byte_s: float
) -> AsyncIterator[bytes]:
    """The body unchanged; once it is all sent, ``timer`` gives the upstream ``first_byte_s``."""
    async for chunk in body:
        yield chunk
    if not timer.expired():
        with contextlib.suppress(RuntimeError):  # the answer came first: the timer is gone
            timer.reschedule(asyncio.get_running_loop().time() + first_byte_s)


async def observed(body: AsyncIterator[bytes], probe: UploadProbe) -> AsyncIterator[bytes]:
    """The body unchanged, each chunk shown to ``probe`` on its way (e.g. a WAV header)."""
    async for chunk in body:
        probe.feed(chunk)
        yield chunk
