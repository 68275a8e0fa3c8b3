"""An Ollama stand-in (Go ``encoding/json`` wire format: struct field order, ``omitempty``,
``<``/``>``/``&`` escaped, one object per line).

``/api/generate`` and ``/api/chat`` stream by default as ``application/x-ndjson``; the last line
has ``"done":true`` and the metrics (durations in nanoseconds). ``"stream": false`` answers one
object as ``application/json; charset=utf-8``. ``/api/embed`` answers embeddings and
``prompt_eval_count``. Quirk kept: a prompt seen before is served from the cache and its
``prompt_eval_count`` (zero) is omitted.

Tokens: whitespace words of the prompt (or of the messages' contents); generation yields
``w0 w1 ...`` up to ``options.num_predict`` (default ``default_predict``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.standins.recording import Recorder, words

CREATED_AT = "2024-07-22T20:47:51.147561Z"
LOAD_NS = 6_683_708
PROMPT_NS_PER_TOKEN = 1_250_000
EVAL_NS_PER_TOKEN = 15_000_000


def go_json(obj: Any) -> bytes:
    """Go's json.Marshal: compact, HTML characters escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(ch, esc)
    return text.encode()


@dataclass
class Ollama(Recorder):
    default_predict: int = 8
    cache: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_get("/api/tags", self.tags)
        return app

    async def tags(self, request: web.Request) -> web.Response:
        return self.reply(go_json({"models": []}), "application/json; charset=utf-8")

    def _metrics(self, prompt: str, n: int) -> dict[str, Any]:
        """Metrics with omitempty: a cached prompt has no prompt_eval_count."""
        p = 0 if prompt in self.cache else len(words(prompt))
        self.cache.add(prompt)
        m: dict[str, Any] = {
            "total_duration": LOAD_NS + p * PROMPT_NS_PER_TOKEN + n * EVAL_NS_PER_TOKEN + 1000,
            "load_duration": LOAD_NS,
        }
        if p:
            m["prompt_eval_count"] = p
            m["prompt_eval_duration"] = p * PROMPT_NS_PER_TOKEN
        if n:
            m["eval_count"] = n
            m["eval_duration"] = n * EVAL_NS_PER_TOKEN
        return m

    def _n(self, doc: dict[str, Any]) -> int:
        options = doc.get("options") or {}
        return int(options.get("num_predict", self.default_predict))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        prompt = " ".join(str(doc.get(k, "")) for k in ("system", "prompt") if doc.get(k))
        pieces = [f"w{i}" if i == 0 else f" w{i}" for i in range(self._n(doc))]
        model = str(doc.get("model", "llama3.2"))
        metrics = self._metrics(prompt, len(pieces))
        final = {
            "model": model,
            "created_at": CREATED_AT,
            "response": "",
            "done": True,
            "done_reason": "length",
            "context": [1, 2, 3],
            **metrics,
        }
        if doc.get("stream") is False:
            final["response"] = "".join(pieces) + " <&>"
            return self.reply(go_json(final) + b"\n", "application/json; charset=utf-8")
        resp = await self.open_stream(request, "application/x-ndjson")
        for piece in pieces:
            line = {"model": model, "created_at": CREATED_AT, "response": piece, "done": False}
            await self.write(resp, go_json(line) + b"\n")
        await self.write(resp, go_json(final) + b"\n")
        await resp.write_eof()
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        prompt = " ".join(
            str(m.get("content", "")) for m in doc.get("messages", []) if isinstance(m, dict)
        )
        pieces = [f"w{i}" if i == 0 else f" w{i}" for i in range(self._n(doc))]
        model = str(doc.get("model", "llama3.2"))
        metrics = self._metrics(prompt, len(pieces))
        if doc.get("stream") is False:
            body = {
                "model": model,
                "created_at": CREATED_AT,
                "message": {"role": "assistant", "content": "".join(pieces)},
                "done_reason": "length",
                "done": True,
                **metrics,
            }
            return self.reply(go_json(body) + b"\n", "application/json; charset=utf-8")
        resp = await self.open_stream(request, "application/x-ndjson")
        for piece in pieces:
            line = {
                "model": model,
                "created_at": CREATED_AT,
                "message": {"role": "assistant", "content": piece},
                "done": False,
            }
            await self.write(resp, go_json(line) + b"\n")
        final = {
            "model": model,
            "created_at": CREATED_AT,
            "message": {"role": "assistant", "content": ""},
            "done_reason": "length",
            "done": True,
            **metrics,
        }
        await self.write(resp, go_json(final) + b"\n")
        await resp.write_eof()
        return resp

    async def embed(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        inputs = doc.get("input", "")
        items = [inputs] if isinstance(inputs, str) else [str(x) for x in inputs]
        body = {
            "model": str(doc.get("model", "all-minilm")),
            "embeddings": [[0.010071029, -0.0017594862, 0.05007221] for _ in items],
            "total_duration": 14143917,
            "load_duration": 1019500,
            "prompt_eval_count": sum(len(words(t)) for t in items),
        }
        return self.reply(go_json(body), "application/json; charset=utf-8")
