"""Stand-in OpenAI-compatible inference servers for the demo, tests and benchmarks.

``StandIn`` speaks the wire format of three real servers, chosen by ``flavor``:

- ``vllm``: compact JSON chunks (``model_dump_json(exclude_unset=True)``), a usage-only chunk
  (``"choices":[]``) when ``stream_options.include_usage`` is set, then ``data: [DONE]``;
- ``llamacpp``: usage and ``timings`` on the finish chunk, no ``[DONE]``;
- ``transformers``: no usage in streams at all, no ``[DONE]``.

Tokens are whitespace words; latencies follow a per-task model so energy differs by task.

``FastStandIn`` is vLLM's chat route at zero latency with bodies precomputed per model name,
for the benchmarks (``bench/upstream.py`` runs it). Both build their JSON with the functions
below, so they send the same bytes for the same answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.standins.recording import compact
from proxy.usage.base import parse_json

FLAVORS = ("vllm", "llamacpp", "transformers")


@dataclass(frozen=True, slots=True)
class Latency:
    """Seconds: before the first token, and per generated token (or per image step)."""

    prefill_s: float = 0.02
    per_token_s: float = 0.01


DEFAULT_LATENCY: dict[str, Latency] = {
    "text-generation": Latency(0.03, 0.012),
    "summarization": Latency(0.05, 0.012),
    "image-to-text": Latency(0.08, 0.012),
    "feature-extraction": Latency(0.015, 0.0),
    "text-classification": Latency(0.01, 0.0),
    "text-to-image": Latency(0.05, 0.06),
}


def count_tokens(text: str) -> int:
    return len(text.split())


# -- vLLM's JSON, field for field --------------------------------------------------------------

DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """vLLM's ``UsageInfo``, in its field order."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def generated(n: int) -> list[str]:
    """The text pieces of ``n`` generated tokens: ``w0``, `` w1``, ..."""
    return [f"w{i}" if i == 0 else f" w{i}" for i in range(n)]


def head(rid: str, created: int, model: str, chat: bool, stream: bool) -> dict[str, Any]:
    """The fields every answer (or stream chunk) starts with."""
    obj = "chat.completion" if chat else "text_completion"
    if chat and stream:
        obj += ".chunk"
    return {"id": rid, "object": obj, "created": created, "model": model}


def completion(
    start: dict[str, Any], text: str, used: dict[str, int], chat: bool
) -> dict[str, Any]:
    """A non-streaming answer that stopped at its token limit."""
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update({"logprobs": None, "finish_reason": "length"})
    return {**start, "choices": [choice], "usage": used}


def role_chunk(start: dict[str, Any]) -> dict[str, Any]:
    """A chat stream's first chunk: the role, no content yet."""
    delta = {"role": "assistant", "content": ""}
    return {
        **start,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
    }


def content_chunk(start: dict[str, Any], piece: str, chat: bool, last: bool) -> dict[str, Any]:
    """One generated token; the last one carries the finish reason."""
    c: dict[str, Any] = {"index": 0}
    if chat:
        c["delta"] = {"content": piece}
    else:
        c["text"] = piece
    c.update({"logprobs": None, "finish_reason": "length" if last else None})
    return {**start, "choices": [c]}


def usage_chunk(start: dict[str, Any], used: dict[str, int]) -> dict[str, Any]:
    """The usage-only chunk vLLM adds when ``stream_options.include_usage`` is set."""
    return {**start, "choices": [], "usage": used}


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + compact(obj) + b"\n\n"


@dataclass
class StandIn:
    """The server's behaviour; ``app()`` builds the aiohttp application.

    Args:
        flavor: ``vllm``, ``llamacpp`` or ``transformers``.
        latency: per task; ``scale`` multiplies every delay (0 for benchmarks).
        task_of_model: model name prefix -> task, so one server can answer every task.
    """

    flavor: str = "vllm"
    latency: dict[str, Latency] = field(default_factory=lambda: dict(DEFAULT_LATENCY))
    scale: float = 1.0
    default_max_tokens: int = 16
    task_of_model: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0
    keep_requests: bool = True

    def _task(self, model: str, default: str) -> str:
        for prefix, task in self.task_of_model.items():
            if model.startswith(prefix):
                return task
        return default

    async def _sleep(self, seconds: float) -> None:
        if seconds * self.scale > 0:
            await asyncio.sleep(seconds * self.scale)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/images/generations", self.images)
        app.router.add_post("/classify", self.classify)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "stand-in", "object": "model", "owned_by": "vllm"}]}
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        doc = await request.json()
        if self.keep_requests:
            self.requests.append(
                {"path": request.path, "headers": dict(request.headers), "body": doc}
            )
        return doc if isinstance(doc, dict) else {}

    # -- generation ---------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await self._body(request)
        text = "\n".join(
            m["content"]
            if isinstance(m.get("content"), str)
            else " ".join(c.get("text", "") for c in m.get("content", []) if isinstance(c, dict))
            for m in doc.get("messages", [])
            if isinstance(m, dict)
        )
        return await self._generate(request, doc, text, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        doc = await self._body(request)
        prompt = doc.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        return await self._generate(request, doc, text, chat=False)

    async def _generate(
        self, request: web.Request, doc: dict[str, Any], prompt: str, chat: bool
    ) -> web.StreamResponse:
        model = str(doc.get("model", "stand-in"))
        task = self._task(model, "text-generation")
        lat = self.latency.get(task, Latency())
        n = int(
            doc.get("max_tokens") or doc.get("max_completion_tokens") or self.default_max_tokens
        )
        pieces = generated(n)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:16]
        created = int(time.time())
        used = usage(count_tokens(prompt), n)
        await self._sleep(lat.prefill_s)
        if not doc.get("stream"):
            await self._sleep(lat.per_token_s * n)
            body = completion(head(rid, created, model, chat, False), "".join(pieces), used, chat)
            return web.Response(body=compact(body), content_type="application/json")
        include_usage = bool((doc.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        start = head(rid, created, model, chat, True)
        try:
            if chat:
                await resp.write(sse(role_chunk(start)))
            for i, piece in enumerate(pieces):
                await self._sleep(lat.per_token_s)
                last = i == n - 1
                event = content_chunk(start, piece, chat, last)
                if last and self.flavor == "llamacpp":
                    event["usage"] = used
                    event["timings"] = {"prompt_n": used["prompt_tokens"], "predicted_n": n}
                await resp.write(sse(event))
            if self.flavor == "vllm":
                if include_usage:
                    await resp.write(sse(usage_chunk(start, used)))
                await resp.write(DONE)
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            self.disconnects += 1
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        return resp

    # -- other tasks ------------------------------------------------------------------------

    async def _pooling(
        self, request: web.Request, task: str, id_prefix: str, item: dict[str, Any]
    ) -> web.Response:
        """vLLM's answer to a pooling request (embeddings, classification): one ``data`` item
        per input and prompt-only usage."""
        doc = await self._body(request)
        inputs = doc.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        tokens = sum(count_tokens(str(x)) for x in items)
        await self._sleep(self.latency[task].prefill_s)
        body = {
            "id": id_prefix + uuid.uuid4().hex[:16],
            "object": "list",
            "created": int(time.time()),
            "model": doc.get("model", "stand-in"),
            "data": [{"index": i, **item} for i in range(len(items))],
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
        return web.Response(body=compact(body), content_type="application/json")

    async def embeddings(self, request: web.Request) -> web.Response:
        item = {"object": "embedding", "embedding": [0.1, -0.2, 0.3]}
        return await self._pooling(request, "feature-extraction", "embd-", item)

    async def classify(self, request: web.Request) -> web.Response:
        item = {"label": "positive", "probs": [0.1, 0.9], "num_classes": 2}
        return await self._pooling(request, "text-classification", "classify-", item)

    async def images(self, request: web.Request) -> web.Response:
        doc = await self._body(request)
        n = int(doc.get("n") or 1)
        steps = int(doc.get("num_inference_steps") or 20)
        lat = self.latency["text-to-image"]
        await self._sleep(lat.prefill_s + lat.per_token_s * steps * n)
        png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
        body = {"created": int(time.time()), "data": [{"b64_json": png} for _ in range(n)]}
        return web.Response(body=compact(body), content_type="application/json")


# -- the benchmarks' upstream ----------------------------------------------------------------

#: Content chunks per streamed answer of ``FastStandIn``.
FAST_CHUNKS = 20
#: The prompt tokens ``FastStandIn`` reports, whatever the prompt.
FAST_PROMPT_TOKENS = 64
#: Seconds a held stream waits for ``/bench/release`` before it finishes anyway.
HOLD_MAX_S = 300.0
_FAST_ID = "chatcmpl-bench"
_FAST_CREATED = 1700000000
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class FastStandIn:
    """vLLM's ``POST /v1/chat/completions`` at zero latency, for the benchmarks.

    A non-streaming completion with usage, or (``"stream": true``) ``FAST_CHUNKS`` content
    chunks, a usage chunk when ``stream_options.include_usage`` is set, then ``[DONE]``; the
    bytes are built once per model name. The model name ``hold`` sends the headers and one
    chunk, then waits until ``GET /bench/release`` (or ``HOLD_MAX_S``) before it finishes: the
    idle streams of the memory benchmark. ``GET /bench/held`` counts the streams held now.
    """

    def __init__(self) -> None:
        self._bodies: dict[str, bytes] = {}
        self._events: dict[str, tuple[list[bytes], bytes]] = {}
        self.release = asyncio.Event()
        self.held = 0

    def _body(self, model: str) -> bytes:
        found = self._bodies.get(model)
        if found is None:
            text = "".join(generated(FAST_CHUNKS))
            start = head(_FAST_ID, _FAST_CREATED, model, chat=True, stream=False)
            used = usage(FAST_PROMPT_TOKENS, FAST_CHUNKS)
            found = self._bodies[model] = compact(completion(start, text, used, chat=True))
        return found

    def _stream(self, model: str) -> tuple[list[bytes], bytes]:
        """The content events of one streamed answer, and its usage event."""
        found = self._events.get(model)
        if found is None:
            start = head(_FAST_ID, _FAST_CREATED, model, chat=True, stream=True)
            events = [
                sse(content_chunk(start, piece, chat=True, last=i == FAST_CHUNKS - 1))
                for i, piece in enumerate(generated(FAST_CHUNKS))
            ]
            used = sse(usage_chunk(start, usage(FAST_PROMPT_TOKENS, FAST_CHUNKS)))
            found = self._events[model] = (events, used)
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
            return web.Response(body=self._body(model), content_type="application/json")
        include_usage = bool((doc.get("stream_options") or {}).get("include_usage"))
        events, used = self._stream(model)
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        try:
            if model == "hold":
                await self._hold(resp, events)
            else:
                for event in events:
                    await resp.write(event)
            if include_usage:
                await resp.write(used)
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
