"""Driving a test proxy: send chat requests as a user, wait until every record is in the ledger."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from proxy.app import Parts

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "one two three"}]}


async def chat(
    session: aiohttp.ClientSession,
    base: str,
    user: str | None = None,
    key: str | None = None,
    team: str | None = None,
) -> tuple[int, str, dict[str, str]]:
    """One chat completion through the proxy: (status, request id, headers)."""
    headers = {}
    if user is not None:
        headers["X-Wattproxy-User"] = user
    if team is not None:
        headers["X-Wattproxy-Team"] = team
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers=headers) as r:
        await r.read()
        return r.status, r.headers.get("X-Request-Id", ""), dict(r.headers)


async def settle(parts: Parts, timeout_s: float = 15.0) -> None:
    """Wait until every request is final and the writer has nothing left (memory or spool)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while parts.accountant.requests or parts.writer.backlog:
        if loop.time() > deadline:
            raise AssertionError(
                f"not settled in {timeout_s} s: {len(parts.accountant.requests)} open, "
                f"backlog {parts.writer.backlog}"
            )
        await asyncio.sleep(0.02)
    # the last batch may still be on its way to the ledger
    await parts.writer.flush()
