"""An upstream that records every request it receives (whole or broken off) and answers each
with a small OpenAI-style completion; and the check that a proxy in front of it still serves."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.helpers.through_proxy import CHAT


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    complete: bool


@dataclass
class RecordingUpstream:
    """An upstream that records every request it receives (whole or broken off) and answers
    with a small OpenAI-style completion."""

    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        chunks: list[bytes] = []
        complete = True
        try:
            async for chunk in request.content.iter_any():
                chunks.append(chunk)
        except (aiohttp.ClientPayloadError, ConnectionError, asyncio.CancelledError):
            complete = False
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                {k.lower(): v for k, v in request.headers.items()},
                b"".join(chunks),
                complete,
            )
        )
        if not complete:
            raise ConnectionResetError("request broke off")
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


async def recorder_server(aiohttp_server: Any) -> tuple[RecordingUpstream, TestServer]:
    rec = RecordingUpstream()
    server: TestServer = await aiohttp_server(rec.app())
    return rec, server


async def still_serves(base: str) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(base + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 200
        assert (await r.json())["usage"]["total_tokens"] == 2
