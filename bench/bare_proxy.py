"""The floor of our own stack: an aiohttp pass-through proxy with no metering, nothing else.

Same server, client, event loop (uvloop) and pooled keep-alive connections as wattproxy, and
bodies relayed chunk by chunk, so wattproxy's throughput divided by this one's is the price of
metering and policy. Run: ``python -m bench.bare_proxy --port 8002 --upstream URL``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

from bench.upstream import HOST, raise_fd_limit

HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "content-length",
    )
)
#: Request bodies up to this size are read whole (as nginx buffers them); larger ones stream.
BUFFER_BODY_BYTES = 1024 * 1024
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP}


async def handle(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    length = request.content_length
    small = length is not None and length <= BUFFER_BODY_BYTES
    body = await request.read() if small else request.content
    async with session.request(
        request.method,
        request.app[UPSTREAM] + request.raw_path,
        headers=_headers(request.headers),
        data=body if request.body_exists else None,
        allow_redirects=False,
    ) as resp:
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        out.headers.update(_headers(resp.headers))
        if resp.content_length is not None:
            out.content_length = resp.content_length
        try:
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
        except ConnectionResetError:  # the client went away (aiohttp's error subclasses it)
            pass
        return out


def app(upstream: str) -> web.Application:
    application = web.Application(client_max_size=64 * 1024 * 1024)
    application[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(a: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        a[SESSION] = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=300),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        yield
        await a[SESSION].close()

    application.cleanup_ctx.append(session_ctx)
    application.router.add_route("*", "/{tail:.*}", handle)
    return application


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    raise_fd_limit()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is in the dev extra
        pass
    web.run_app(app(args.upstream), host=HOST, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
