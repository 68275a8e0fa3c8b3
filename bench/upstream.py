"""A fast stand-in OpenAI-compatible server for the benchmarks: zero latency, precomputed bodies.

``POST /v1/chat/completions`` answers a non-streaming completion with usage, or (``"stream":
true``) a 20-chunk SSE stream shaped like vLLM's: compact JSON chunks, a usage-only chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. The model name ``hold`` sends the
headers and one chunk, then waits until ``GET /bench/release`` (or ``HOLD_MAX_S``) before it
finishes: the idle streams of the memory benchmark.

Run: ``python -m bench.upstream --port 8001`` (uvloop when installed; 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
from typing import Any

from aiohttp import web

from proxy.usage.base import parse_json

#: Content chunks per streamed answer.
STREAM_CHUNKS = 20
#: Seconds a held stream waits for ``/bench/release`` before it finishes anyway.
HOLD_MAX_S = 300.0
HOST = "127.0.0.1"

PROMPT_TOKENS = 64


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _usage(completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "total_tokens": PROMPT_TOKENS + completion,
        "completion_tokens": completion,
    }


_BASE = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000}


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _chunk(model: str, i: int, last: bool) -> bytes:
    choice = {
        "index": 0,
        "delta": {"content": f" w{i}" if i else "w0"},
        "logprobs": None,
        "finish_reason": "length" if last else None,
    }
    return _event({**_BASE, "model": model, "choices": [choice]})


def completion_body(model: str) -> bytes:
    """A non-streaming chat completion with usage."""
    text = " ".join(f"w{i}" for i in range(STREAM_CHUNKS))
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": _usage(STREAM_CHUNKS),
        }
    )


def stream_events(model: str) -> list[bytes]:
    """The SSE events of one streamed answer, without the usage chunk and ``[DONE]``."""
    return [_chunk(model, i, i == STREAM_CHUNKS - 1) for i in range(STREAM_CHUNKS)]


def usage_event(model: str) -> bytes:
    return _event({**_BASE, "model": model, "choices": [], "usage": _usage(STREAM_CHUNKS)})


DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class Upstream:
    """The handlers, with bodies precomputed per model name."""

    def __init__(self) -> None:
        self._bodies: dict[str, bytes] = {}
        self._events: dict[str, tuple[list[bytes], bytes]] = {}
        self.release = asyncio.Event()
        self.held = 0

    def _stream(self, model: str) -> tuple[list[bytes], bytes]:
        found = self._events.get(model)
        if found is None:
            found = self._events[model] = (stream_events(model), usage_event(model))
        return found

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        app.router.add_get("/bench/release", self.do_release)
        app.router.add_get("/bench/held", self.held_count)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def held_count(self, request: web.Request) -> web.Response:
        return web.Response(text=str(self.held))

    async def do_release(self, request: web.Request) -> web.Response:
        """Finish every held stream; streams opened afterwards are held again."""
        release, self.release = self.release, asyncio.Event()
        release.set()
        return web.Response(text=str(self.held))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = parse_json(await request.read())
        model = str(doc.get("model", "bench"))
        if not doc.get("stream"):
            body = self._bodies.get(model)
            if body is None:
                body = self._bodies[model] = completion_body(model)
            return web.Response(body=body, content_type="application/json")
        options = doc.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        events, usage = self._stream(model)
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        try:
            if model == "hold":
                await self._hold(resp, events)
            else:
                for event in events:
                    await resp.write(event)
            if include_usage:
                await resp.write(usage)
            await resp.write(DONE)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    async def _hold(self, resp: web.StreamResponse, events: list[bytes]) -> None:
        await resp.write(events[0])
        self.held += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), HOLD_MAX_S)
        finally:
            self.held -= 1
        await resp.write(b"".join(events[1:]))


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit towards ``wanted``; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def serve(port: int) -> None:
    raise_fd_limit()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is in the dev extra
        pass
    web.run_app(
        Upstream().app(),
        host=HOST,
        port=port,
        access_log=None,
        print=None,
        backlog=4096,
        handle_signals=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    serve(p.parse_args().port)


if __name__ == "__main__":
    main()
