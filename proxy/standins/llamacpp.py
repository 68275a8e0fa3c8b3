"""Byte-exact replays of the two llama.cpp servers' chat streams, and a stand-in that answers
with them as each server would for the request's ``stream_options``.

**llama-cpp-python 0.3 server** (``llama_cpp/server/app.py``): sse-starlette with ``sep="\\n"``,
each chunk ``json.dumps``-ed with Python's default separators and ASCII escapes; a role chunk
(``{"role": "assistant"}``), one chunk per text piece (``{"content": ...}``), a finish chunk with
an empty delta, then ``[DONE]``. No usage in a stream, whatever ``stream_options`` say. Text is
streamed as soon as the pending tokens decode as UTF-8; tokens that never do (stray byte tokens)
are held and, once generation ends, flushed one chunk per token, each decoded on its own with
``errors="ignore"``: a real generated token arrives as ``"content": ""``. The replay: "Hi", then
the flush of two stray bytes, " there", one stray byte and "!": 6 tokens, 3 with text.

**llama.cpp's own server** (``tools/server/server-task.cpp``, nlohmann ordered JSON, compact,
raw UTF-8): a role chunk with ``"content":null``, one chunk per text diff (incomplete UTF-8 is
held back, so a 4-byte emoji's four tokens arrive as one chunk), a finish chunk with an empty
delta; with ``include_usage`` a usage chunk (``choices: []``) follows. ``timings`` go on the
last chunk sent (the usage chunk, or else the finish chunk). ``usage.prompt_tokens`` is the
whole prompt; ``timings.prompt_n`` only the part not taken from the cache (``cache_n``). The
replay: "Hi", " ", "👋" (4 byte tokens) and the end-of-generation token: 7 tokens in 3 chunks
with text, for a 9-token prompt of which 4 came from the cache.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.standins.recording import Recorder

# -- llama-cpp-python ---------------------------------------------------------------------------

PY_GENERATED = 6
_PY_HEAD = (
    'data: {"id": "chatcmpl-4f0b6c2e-9a51-4d7e-8c3a-1b2d3e4f5a6b", "model": "m", '
    '"created": 1733300000, "object": "chat.completion.chunk", "choices": [{"index": 0, '
)


def _py_chunk(delta: str, finish: str = "null") -> bytes:
    return (
        _PY_HEAD + f'"delta": {delta}, "logprobs": null, "finish_reason": {finish}}}]}}\n\n'
    ).encode()


LLAMA_CPP_PYTHON = (
    _py_chunk('{"role": "assistant"}')
    + _py_chunk('{"content": "Hi"}')
    + _py_chunk('{"content": ""}')
    + _py_chunk('{"content": ""}')
    + _py_chunk('{"content": " there"}')
    + _py_chunk('{"content": ""}')
    + _py_chunk('{"content": "!"}')
    + _py_chunk("{}", '"stop"')
    + b"data: [DONE]\n\n"
)

# -- llama.cpp server ---------------------------------------------------------------------------

SERVER_PROMPT = 9
SERVER_GENERATED = 7
_TAIL = (
    ',"created":1733300000,"id":"chatcmpl-Z8fQ2mN4pL6rT1vX3yB5wC7","model":"m",'
    '"system_fingerprint":"b6097-9515c613","object":"chat.completion.chunk"'
)
TIMINGS = (
    '"timings":{"cache_n":4,"prompt_n":5,"prompt_ms":41.52,"prompt_per_token_ms":8.304,'
    '"prompt_per_second":120.42389210019268,"predicted_n":7,"predicted_ms":118.7,'
    '"predicted_per_token_ms":16.957142857142856,"predicted_per_second":58.97219882055602}'
)
USAGE = (
    '"usage":{"completion_tokens":7,"prompt_tokens":9,"total_tokens":16,'
    '"prompt_tokens_details":{"cached_tokens":4}}'
)


def _server_chunk(delta: str, finish: str = "null", extra: str = "") -> bytes:
    choice = f'{{"finish_reason":{finish},"index":0,"delta":{delta}}}'
    return f'data: {{"choices":[{choice}]{_TAIL}{extra}}}\n\n'.encode()


def llama_server_stream(include_usage: bool) -> bytes:
    """The stream llama-server sends, with or without ``stream_options.include_usage``."""
    out = [
        _server_chunk('{"role":"assistant","content":null}'),
        _server_chunk('{"content":"Hi"}'),
        _server_chunk('{"content":" "}'),
        _server_chunk('{"content":"👋"}'),
    ]
    if include_usage:
        out.append(_server_chunk("{}", '"stop"'))
        out.append(f'data: {{"choices":[]{_TAIL},{USAGE},{TIMINGS}}}\n\n'.encode())
    else:
        out.append(_server_chunk("{}", '"stop"', "," + TIMINGS))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


class LlamaCpp(Recorder):
    """``/v1/chat/completions`` answered by one of the two servers (``python``: llama-cpp-python,
    ``server``: llama.cpp's server), one write per event."""

    def __init__(self, flavor: str) -> None:
        super().__init__()
        self.flavor = flavor

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc: dict[str, Any] = await self.receive_json(request)
        options = doc.get("stream_options")
        include = isinstance(options, dict) and options.get("include_usage") is True
        if self.flavor == "python":
            stream = LLAMA_CPP_PYTHON
            content_type = "text/event-stream; charset=utf-8"
        else:
            stream = llama_server_stream(include)
            content_type = "text/event-stream"
        resp = await self.open_stream(request, content_type)
        for event in stream.split(b"\n\n")[:-1]:
            await self.write(resp, event + b"\n\n")
        await resp.write_eof()
        return resp
