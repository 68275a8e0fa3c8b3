"""A text-generation-inference stand-in (router v2/v3 wire format, serde field order).

Native: ``POST /generate`` -> ``{"generated_text", "details"?}`` with ``x-prompt-tokens`` and
``x-generated-tokens`` headers; ``POST /generate_stream`` -> SSE written by axum
(``data:{...}\\n\\n``, no space), one event per token, the last with ``generated_text`` and
``details`` (``input_length`` included) when ``parameters.details`` is true; ``POST /`` -> either,
by ``"stream"``, the non-streaming answer wrapped in a list. OpenAI: ``/v1/chat/completions`` and
``/v1/completions`` with ``"usage":null`` on every chunk and a usage chunk when asked.

Tokens: ``<s>`` then the prompt's whitespace words; generation yields ``w0 w1 ...`` and ends with
a special ``</s>`` when ``eos_after`` words were generated before ``max_new_tokens``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.standins.recording import Recorder, compact, words

TIMING_HEADERS = {
    "x-compute-type": "gpu+optimized",
    "x-compute-time": "0.012",
    "x-total-time": "12",
    "x-validation-time": "1",
    "x-queue-time": "0",
    "x-inference-time": "11",
    "x-time-per-token": "1",
}


@dataclass
class TGI(Recorder):
    """Args: eos_after: words generated before the end-of-sequence token (None: never)."""

    eos_after: int | None = None
    default_max_new_tokens: int = 100
    keep_alive_first: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_post("/", self.compat)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/info", self.info)
        return app

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_id": "stand-in", "version": "3.0.0"})

    def _run(
        self, inputs: str, params: dict[str, Any]
    ) -> tuple[list[str], list[dict[str, Any]], str]:
        """Prompt tokens, generated tokens, finish reason."""
        prompt = ["<s>", *words(inputs)]
        n = int(params.get("max_new_tokens") or self.default_max_new_tokens)
        out: list[dict[str, Any]] = []
        reason = "length"
        for i in range(n):
            if self.eos_after is not None and i == self.eos_after:
                out.append({"id": 2, "text": "</s>", "logprob": -0.25, "special": True})
                reason = "eos_token"
                break
            text = f"w{i}" if i == 0 else f" w{i}"
            out.append({"id": 1000 + i, "text": text, "logprob": -0.5, "special": False})
        return prompt, out, reason

    @staticmethod
    def _text(tokens: list[dict[str, Any]]) -> str:
        return "".join(t["text"] for t in tokens if not t["special"])

    def _generate_body(self, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        params = doc.get("parameters") or {}
        prompt, tokens, reason = self._run(str(doc.get("inputs", "")), params)
        body: dict[str, Any] = {"generated_text": self._text(tokens)}
        if params.get("details"):
            prefill = []
            if params.get("decoder_input_details"):
                prefill = [
                    {"id": 1 if i == 0 else 100 + i, "text": t, "logprob": None if i == 0 else -1.5}
                    for i, t in enumerate(prompt)
                ]
            body["details"] = {
                "finish_reason": reason,
                "generated_tokens": len(tokens),
                "seed": None,
                "prefill": prefill,
                "tokens": tokens,
            }
        headers = {
            **TIMING_HEADERS,
            "x-compute-characters": str(len(str(doc.get("inputs", "")))),
            "x-prompt-tokens": str(len(prompt)),
            "x-generated-tokens": str(len(tokens)),
        }
        return body, headers

    async def generate(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        body, headers = self._generate_body(doc)
        return self.reply(compact(body), "application/json", headers)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        return await self._stream(request, doc)

    async def compat(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        if doc.get("stream"):
            return await self._stream(request, doc)
        body, headers = self._generate_body(doc)
        return self.reply(compact([body]), "application/json", headers)

    async def _stream(self, request: web.Request, doc: dict[str, Any]) -> web.StreamResponse:
        params = doc.get("parameters") or {}
        prompt, tokens, reason = self._run(str(doc.get("inputs", "")), params)
        resp = await self.open_stream(
            request,
            "text/event-stream",
            {
                "cache-control": "no-cache",
                "x-compute-type": "gpu+optimized",
                "x-accel-buffering": "no",
            },
        )
        if self.keep_alive_first:
            await self.write(resp, b":\n\n")
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            event: dict[str, Any] = {
                "index": i + 1,
                "token": token,
                "generated_text": self._text(tokens) if last else None,
                "details": None,
            }
            if last and params.get("details"):
                event["details"] = {
                    "finish_reason": reason,
                    "generated_tokens": len(tokens),
                    "seed": None,
                    "input_length": len(prompt),
                }
            await self.write(resp, b"data:" + compact(event) + b"\n\n")
        await resp.write_eof()
        return resp

    # -- OpenAI routes (TGI's Messages API) ---------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        text = "\n".join(
            str(m.get("content", "")) for m in doc.get("messages", []) if isinstance(m, dict)
        )
        return await self._openai(request, doc, text, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        return await self._openai(request, doc, str(doc.get("prompt", "")), chat=False)

    async def _openai(
        self, request: web.Request, doc: dict[str, Any], text: str, chat: bool
    ) -> web.StreamResponse:
        params = {"max_new_tokens": doc.get("max_tokens")}
        prompt, tokens, reason = self._run(text, params)
        finish = "stop" if reason == "eos_token" else "length"
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens),
            "total_tokens": len(prompt) + len(tokens),
        }
        created = int(time.time())
        model = str(doc.get("model", "tgi"))
        obj = "chat.completion" if chat else "text_completion"
        if not doc.get("stream"):
            choice: dict[str, Any] = {"index": 0}
            if chat:
                choice["message"] = {"role": "assistant", "content": self._text(tokens)}
            else:
                choice["text"] = self._text(tokens)
            choice.update({"logprobs": None, "finish_reason": finish})
            body = {
                "object": obj,
                "id": "",
                "created": created,
                "model": model,
                "system_fingerprint": "3.0.0-native",
                "choices": [choice],
                "usage": usage,
            }
            return self.reply(compact(body), "application/json")
        resp = await self.open_stream(request, "text/event-stream")
        base = {
            "object": obj + ".chunk" if chat else obj,
            "id": "",
            "created": created,
            "model": model,
            "system_fingerprint": "3.0.0-native",
        }
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            c: dict[str, Any] = {"index": 0}
            content = "" if token["special"] else token["text"]
            if chat:
                c["delta"] = {"role": "assistant", "content": content}
            else:
                c["text"] = content
            c.update({"logprobs": None, "finish_reason": finish if last else None})
            chunk = {**base, "choices": [c], "usage": None}
            await self.write(resp, b"data:" + compact(chunk) + b"\n\n")
        if (doc.get("stream_options") or {}).get("include_usage"):
            await self.write(
                resp, b"data:" + compact({**base, "choices": [], "usage": usage}) + b"\n\n"
            )
        await self.write(resp, b"data:[DONE]\n\n")
        await resp.write_eof()
        return resp
