"""Requests through a proxy under test, and their records: the chat body most tests send, a
config with one upstream of a given API, one call and its final record."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config import Config
from tests.conftest import proxy_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "one two three"}]}


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
