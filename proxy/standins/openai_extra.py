"""A stand-in for the OpenAI-compatible routes beyond chat, as vLLM (and vLLM-Omni for images and
speech) serve them: pydantic JSON, SSE framed ``event: <type>\\ndata: <json>\\n\\n``.

- ``/v1/responses``: usage (``input_tokens``/``output_tokens``) in the answer, or in the
  ``response.completed`` event of a stream (``stream_unasked`` streams even when not asked);
- ``/v1/messages`` (Anthropic, vLLM's converter): usage in ``message_start`` (input) and
  ``message_delta`` (both); the nested ``message`` dumped with ``exclude_unset``;
- ``/v1/images/generations``: ``{"created", "data": [{"b64_json"}]}``;
- ``/v1/audio/transcriptions``: multipart upload read as a stream, its WAV length measured with
  the ``wave`` module; ``{"text", "usage": {"type": "duration", "seconds"}}``;
- ``/v1/audio/speech``: a WAV answer streamed in chunks, written the way streaming encoders do
  (data size 0xFFFFFFFF) unless ``sized_wav``;
- ``/v1/rerank`` (``/rerank``, ``/v2/rerank``): ``usage.total_tokens`` only; ``/v1/score``.

Tokens are whitespace words; generation yields ``w0 w1 ...`` up to the request's limit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import math
import struct
import time
import wave
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from proxy.standins.recording import Recorder, Seen, compact, words

SPEECH_RATE_HZ = 24_000
SPEECH_S_PER_WORD = 0.25


def _gen(n: int) -> list[str]:
    return [f"w{i}" if i == 0 else f" w{i}" for i in range(n)]


def _sse(event: str, obj: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: ".encode() + compact(obj) + b"\n\n"


def wav_bytes(seconds: float, rate: int = SPEECH_RATE_HZ, channels: int = 1) -> bytes:
    """A silent 16-bit PCM WAV file of this length."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * channels * int(seconds * rate))
    return buf.getvalue()


@dataclass
class Upload:
    """What the transcription route received."""

    size: int
    sha256: str
    wav_seconds: float | None
    fields: dict[str, str]


@dataclass
class OpenAIExtra(Recorder):
    stream_unasked: bool = False
    sized_wav: bool = False
    default_max_tokens: int = 6
    uploads: list[Upload] = field(default_factory=list)
    #: set once an upload's file part has streamed in past ``progress_at`` bytes
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    progress_at: int = 1 << 20

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/images/generations", self.images)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/speech", self.speech)
        for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
            app.router.add_post(path, self.rerank)
        for path in ("/v1/score", "/score"):
            app.router.add_post(path, self.score)
        return app

    # -- /v1/responses -------------------------------------------------------------------------

    def _response_obj(
        self,
        rid: str,
        model: str,
        status: str,
        text: str | None,
        usage: dict[str, Any] | None,
        max_out: int | None,
    ) -> dict[str, Any]:
        output = []
        if text is not None:
            output = [
                {
                    "id": "msg_1",
                    "content": [
                        {"annotations": [], "text": text, "type": "output_text", "logprobs": None}
                    ],
                    "role": "assistant",
                    "status": "completed",
                    "type": "message",
                }
            ]
        return {
            "id": rid,
            "created_at": 1730000000,
            "incomplete_details": None,
            "instructions": None,
            "metadata": None,
            "model": model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "background": False,
            "max_output_tokens": max_out,
            "max_tool_calls": None,
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": None,
            "top_logprobs": None,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
        }

    async def responses(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        inputs = doc.get("input", "")
        if isinstance(inputs, list):
            inputs = " ".join(str(m.get("content", "")) for m in inputs if isinstance(m, dict))
        prompt = " ".join(filter(None, [str(doc.get("instructions") or ""), str(inputs)]))
        max_out = doc.get("max_output_tokens")
        pieces = _gen(int(max_out or self.default_max_tokens))
        p, n = len(words(prompt)), len(pieces)
        usage = {
            "input_tokens": p,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + n,
        }
        model = str(doc.get("model", "m"))
        rid = "resp_0123456789abcdef"
        text = "".join(pieces)
        if not (doc.get("stream") or self.stream_unasked):
            body = self._response_obj(rid, model, "completed", text, usage, max_out)
            return self.reply(compact(body), "application/json")
        resp = await self.open_stream(request, "text/event-stream; charset=utf-8")
        seq = 0

        async def send(kind: str, **fields: Any) -> None:
            nonlocal seq
            await self.write(resp, _sse(kind, {"type": kind, "sequence_number": seq, **fields}))
            seq += 1

        started = self._response_obj(rid, model, "in_progress", None, None, max_out)
        await send("response.created", response=started)
        await send("response.in_progress", response=started)
        item = {
            "id": "msg_1",
            "content": [],
            "role": "assistant",
            "status": "in_progress",
            "type": "message",
        }
        await send("response.output_item.added", item=item, output_index=0)
        part: dict[str, Any] = {
            "annotations": [],
            "text": "",
            "type": "output_text",
            "logprobs": None,
        }
        await send(
            "response.content_part.added",
            content_index=0,
            item_id="msg_1",
            output_index=0,
            part=part,
        )
        for piece in pieces:
            await send(
                "response.output_text.delta",
                content_index=0,
                delta=piece,
                item_id="msg_1",
                logprobs=[],
                output_index=0,
            )
        await send(
            "response.output_text.done",
            content_index=0,
            item_id="msg_1",
            logprobs=[],
            output_index=0,
            text=text,
        )
        await send(
            "response.content_part.done",
            content_index=0,
            item_id="msg_1",
            output_index=0,
            part={**part, "text": text},
        )
        await send(
            "response.output_item.done", item={**item, "status": "completed"}, output_index=0
        )
        done = self._response_obj(rid, model, "completed", text, usage, max_out)
        await send("response.completed", response=done)
        await resp.write_eof()
        return resp

    # -- /v1/messages --------------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        parts = [str(doc.get("system") or "")]
        for m in doc.get("messages", []):
            content = m.get("content", "")
            if isinstance(content, list):
                content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
            parts.append(str(content))
        p = len(words(" ".join(parts)))
        pieces = _gen(int(doc.get("max_tokens") or self.default_max_tokens))
        model = str(doc.get("model", "m"))
        mid = "chatcmpl-5f1e3c0a9b"
        if not doc.get("stream"):
            body = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "".join(pieces)}],
                "model": model,
                "stop_reason": "max_tokens",
                "stop_sequence": None,
                "usage": {"input_tokens": p, "output_tokens": len(pieces)},
            }
            return self.reply(compact(body), "application/json")
        resp = await self.open_stream(request, "text/event-stream; charset=utf-8")
        start = {
            "type": "message_start",
            "message": {
                "id": mid,
                "content": [],
                "model": model,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": p, "output_tokens": 0},
            },
        }
        await self.write(resp, _sse("message_start", start))
        await self.write(
            resp,
            _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "content_block": {"type": "text", "text": ""},
                    "index": 0,
                },
            ),
        )
        for piece in pieces:
            delta = {
                "type": "content_block_delta",
                "delta": {"type": "text_delta", "text": piece},
                "index": 0,
            }
            await self.write(resp, _sse("content_block_delta", delta))
        await self.write(
            resp, _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        )
        end = {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"input_tokens": p, "output_tokens": len(pieces)},
        }
        await self.write(resp, _sse("message_delta", end))
        await self.write(resp, _sse("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
        return resp

    # -- images, audio -------------------------------------------------------------------------

    async def images(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        n = int(doc.get("n") or 1)
        png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
        body = {"created": int(time.time()), "data": [{"b64_json": png} for _ in range(n)]}
        return self.reply(compact(body), "application/json")

    async def transcriptions(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.path, dict(request.headers), b""))
        reader = await request.multipart()
        fields: dict[str, str] = {}
        digest = hashlib.sha256()
        size = 0
        head = bytearray()
        while True:
            part = await reader.next()
            if part is None:
                break
            assert isinstance(part, BodyPartReader)
            if part.filename is None:
                fields[str(part.name)] = (await part.read()).decode()
                continue
            while chunk := await part.read_chunk(256 * 1024):
                digest.update(chunk)
                size += len(chunk)
                if size >= self.progress_at:
                    self.progress.set()
                if len(head) < 64:
                    head += chunk[:64]
        seconds = _wav_seconds(bytes(head), size)
        self.uploads.append(Upload(size, digest.hexdigest(), seconds, fields))
        text = "the quick brown fox"
        if fields.get("response_format") == "text":
            return self.reply(text.encode() + b"\n", "text/plain; charset=utf-8")
        body = {"text": text, "usage": {"type": "duration", "seconds": math.ceil(seconds or 0)}}
        return self.reply(compact(body), "application/json")

    async def speech(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        seconds = SPEECH_S_PER_WORD * len(words(str(doc.get("input", ""))))
        audio = wav_bytes(seconds)
        if not self.sized_wav:  # streaming encoders do not know the length up front
            audio = audio[:4] + b"\xff\xff\xff\xff" + audio[8:40] + b"\xff\xff\xff\xff" + audio[44:]
        resp = await self.open_stream(request, "audio/wav")
        for i in range(0, len(audio), 4096):
            await self.write(resp, audio[i : i + 4096])
        await resp.write_eof()
        return resp

    # -- rerank, score -------------------------------------------------------------------------

    async def rerank(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        query = str(doc.get("query", ""))
        docs = [d if isinstance(d, str) else d.get("text", "") for d in doc.get("documents", [])]
        tokens = sum(len(words(query)) + len(words(d)) + 3 for d in docs)
        results = sorted(
            (
                {"index": i, "document": {"text": d}, "relevance_score": 1.0 / (i + 2)}
                for i, d in enumerate(docs)
            ),
            key=lambda r: -float(r["relevance_score"]),  # type: ignore[arg-type]
        )
        body = {
            "id": "rerank-8a3b",
            "model": str(doc.get("model", "m")),
            "usage": {"total_tokens": tokens},
            "results": results,
        }
        return self.reply(compact(body), "application/json")

    async def score(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        t1 = doc.get("text_1", "")
        t2 = doc.get("text_2", [])
        t2 = [t2] if isinstance(t2, str) else t2
        tokens = sum(len(words(str(t1))) + len(words(str(t))) + 3 for t in t2)
        body = {
            "id": "score-77c1",
            "object": "list",
            "created": int(time.time()),
            "model": str(doc.get("model", "m")),
            "data": [{"index": i, "object": "score", "score": 0.5} for i in range(len(t2))],
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
        return self.reply(compact(body), "application/json")


def _wav_seconds(head: bytes, size: int) -> float | None:
    """Length of a canonical 44-byte-header PCM WAV from its start and total size."""
    if len(head) < 44 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    (byte_rate,) = struct.unpack_from("<I", head, 28)
    return (size - 44) / byte_rate if byte_rate else None
