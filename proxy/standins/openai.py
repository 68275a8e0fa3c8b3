"""A stand-in OpenAI-compatible inference server for the demo, tests and benchmarks.

It speaks the wire format of three real servers, chosen by ``flavor``:

- ``vllm``: compact JSON chunks (``model_dump_json(exclude_unset=True)``), a usage-only chunk
  (``"choices":[]``) when ``stream_options.include_usage`` is set, then ``data: [DONE]``;
- ``llamacpp``: usage and ``timings`` on the finish chunk, no ``[DONE]``;
- ``transformers``: no usage in streams at all, no ``[DONE]``.

Tokens are whitespace words; latencies follow a per-task model so energy differs by task.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

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


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


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
        prompt_tokens = count_tokens(prompt)
        words = [f"w{i}" for i in range(n)]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:16]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + n,
            "completion_tokens": n,
        }
        await self._sleep(lat.prefill_s)
        if not doc.get("stream"):
            await self._sleep(lat.per_token_s * n)
            text = " ".join(words)
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            body = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
            return web.Response(text=_dumps(body), content_type="application/json")
        include_usage = bool((doc.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        base = {
            "id": rid,
            "object": obj + ".chunk" if chat else obj,
            "created": created,
            "model": model,
        }
        try:
            if chat:
                first = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                await self._event(resp, {**base, "choices": [first]})
            for i, word in enumerate(words):
                await self._sleep(lat.per_token_s)
                last = i == n - 1
                piece = word if i == 0 else " " + word
                c: dict[str, Any] = {"index": 0}
                if chat:
                    c["delta"] = {"content": piece}
                else:
                    c["text"] = piece
                c["logprobs"] = None
                c["finish_reason"] = "length" if last else None
                event: dict[str, Any] = {**base, "choices": [c]}
                if last and self.flavor == "llamacpp":
                    event["usage"] = usage
                    event["timings"] = {"prompt_n": prompt_tokens, "predicted_n": n}
                await self._event(resp, event)
            if self.flavor == "vllm":
                if include_usage:
                    await self._event(resp, {**base, "choices": [], "usage": usage})
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            self.disconnects += 1
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        return resp

    async def _event(self, resp: web.StreamResponse, obj: dict[str, Any]) -> None:
        await resp.write(f"data: {_dumps(obj)}\n\n".encode())

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
        return web.Response(text=_dumps(body), content_type="application/json")

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
        return web.Response(text=_dumps(body), content_type="application/json")
