"""Stand-in inference servers, one per API, speaking each server's exact wire format, and the
helpers the API tests share: a proxy in front of a stand-in, and a request's final record.

Every stand-in records each request it received (path, headers, raw body) and the exact bytes
it answered with, so tests can assert that the client got them unchanged.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.config import Config
from tests.conftest import proxy_config


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


def upstream_config(url: str, tmp_path: Path, api: str, name: str = "x", **upstream: Any) -> Config:
    """A proxy config with one upstream of the given API."""
    return proxy_config(
        url, tmp_path, upstreams=[{"name": name, "url": url, "api": api, **upstream}]
    )


async def final_record(base: str, rid: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Poll the proxy for a request's record until it is final."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{base}/v1/emissions/requests/{rid}") as r:
                if r.status == 200:
                    doc: dict[str, Any] = await r.json()
                    if doc["final"]:
                        return doc
            if loop.time() > deadline:
                raise AssertionError(f"record {rid} not final within {timeout_s} s")
            await asyncio.sleep(0.02)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    record: dict[str, Any]


async def call(
    base: str,
    path: str,
    json_body: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> Answer:
    """One request through the proxy, and its final record."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(method, base + path, json=json_body, data=data, headers=headers) as r,
    ):
        body = await r.read()
        rid = r.headers["X-Request-Id"]
        got = dict(r.headers)
        status = r.status
    return Answer(status, got, body, await final_record(base, rid))
