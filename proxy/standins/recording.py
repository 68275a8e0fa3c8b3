"""What every stand-in shares: it records each request it received (path, headers, raw body)
and the exact bytes it answered with, so a test can assert that the client got them unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def words(text: str) -> list[str]:
    return text.split()


def compact(obj: Any) -> bytes:
    """JSON as serde_json and pydantic write it: no spaces, non-ASCII kept."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """What a stand-in received and sent."""

    seen: list[Seen] = field(default_factory=list)
    sent: list[bytearray] = field(default_factory=list)

    async def receive(self, request: web.Request) -> bytes:
        body = await request.read()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        return body

    async def receive_json(self, request: web.Request) -> dict[str, Any]:
        doc = json.loads(await self.receive(request) or b"{}")
        return doc if isinstance(doc, dict) else {}

    def reply(
        self, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        self.sent.append(bytearray(body))
        resp = web.Response(body=body, headers=headers or {})
        resp.headers["Content-Type"] = content_type
        return resp

    async def open_stream(
        self, request: web.Request, content_type: str, headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        self.sent.append(bytearray())
        resp = web.StreamResponse(headers={"Content-Type": content_type, **(headers or {})})
        await resp.prepare(request)
        return resp

    async def write(self, resp: web.StreamResponse, data: bytes) -> None:
        self.sent[-1] += data
        await resp.write(data)
