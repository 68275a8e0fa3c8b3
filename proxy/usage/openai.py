"""OpenAI-compatible usage capture (vLLM, llama.cpp server, transformers serve, TGI's /v1).

On the request side, a streaming chat or completion that did not ask for
``stream_options.include_usage`` gets it added, and the response parser then removes the
usage-only chunk (and any ``"usage":null`` the server adds to other chunks), so the client sees
exactly the stream it asked for. On the response side, usage is read from whichever event carries
it (the usage-only chunk, or the finish chunk as llama.cpp sends it); servers that never send it
fall back to counting the streamed deltas.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.usage.base import RequestPlan, SSEFramer, StreamUsage, Usage, parse_json, sse_data

STREAM_USAGE_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))
#: Streamed text kept for counting with a tokenizer when the server sends no usage.
MAX_COLLECTED_TEXT = 1024 * 1024

_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')


def _prompt_text(doc: dict[str, Any]) -> str:
    parts: list[str] = []
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts.extend(p for p in prompt if isinstance(p, str))
    for key in ("input", "query", "text", "system"):
        value = doc.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
    for msg in doc.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                c.get("text", "")
                for c in content
                if isinstance(c, dict) and c.get("type") == "text"
            )
    return "\n".join(parts)


def plan_openai_request(path: str, doc: Any) -> RequestPlan:
    """Read model, stream flag and prompt from a parsed JSON body; add include_usage if needed."""
    plan = RequestPlan()
    if not isinstance(doc, dict):
        return plan
    model = doc.get("model")
    plan.model = model if isinstance(model, str) else None
    plan.stream = doc.get("stream") is True
    plan.prompt_text = _prompt_text(doc)
    messages = doc.get("messages")
    plan.messages = messages if isinstance(messages, list) else None
    for key in ("max_completion_tokens", "max_tokens", "max_new_tokens"):
        value = doc.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            plan.max_tokens = value
            break
    n = doc.get("n")
    if path.endswith("/images/generations"):
        plan.images = n if isinstance(n, int) and n > 0 else 1
    user = doc.get("user")
    plan.end_user = user if isinstance(user, str) else None
    if plan.stream and path in STREAM_USAGE_PATHS:
        options = doc.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            new_options = dict(options) if isinstance(options, dict) else {}
            new_options["include_usage"] = True
            plan.inject_usage = True
            plan.body = json.dumps({**doc, "stream_options": new_options}).encode()
    return plan


class OpenAISSE(StreamUsage):
    """Incremental parser of an OpenAI-style SSE response.

    Args:
        strip_usage: the proxy injected include_usage; remove what the client did not ask for.
        collect_text: keep streamed text (bounded) for counting with a tokenizer.
    """

    def __init__(self, strip_usage: bool = False, collect_text: bool = False) -> None:
        self.strip_usage = strip_usage
        self.collect_text = collect_text
        self.tokens = 0
        self.done = False
        self.events = 0
        self._framer = SSEFramer()
        self._usage = Usage()
        self._text: list[str] = []
        self._text_len = 0

    def feed(self, chunk: bytes) -> bytes:
        if not self.strip_usage:
            for event in self._framer.push(chunk):
                self._inspect(event)
            return chunk
        out = []
        for event in self._framer.push(chunk):
            if self._inspect(event):
                if b"null" in event and b'"usage"' in event:
                    event = _USAGE_NULL.sub(b"", event)
                out.append(event)
        return b"".join(out)

    def flush(self) -> bytes:
        rest = self._framer.pending()
        if rest and self.strip_usage:
            return rest if self._inspect(rest) else b""
        if rest:
            self._inspect(rest)
        return rest if self.strip_usage else b""

    def _inspect(self, event: bytes) -> bool:
        """Account one event; False when it is the injected usage-only chunk."""
        data = sse_data(event)
        if data is None:
            return True
        self.events += 1
        if data.strip() == b"[DONE]":
            self.done = True
            return True
        content = _CONTENT.search(data) is not None
        if content:
            self.tokens += 1
        has_usage = b'"usage"' in data and not (
            b"null" in data and _USAGE_NULL.search(data) and data.count(b'"usage"') == 1
        )
        if not has_usage and not (content and self.collect_text):
            return True
        try:
            obj = parse_json(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        if content and self.collect_text:
            self._collect(obj)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage.merge_server(usage.get("prompt_tokens"), usage.get("completion_tokens"))
            if self.strip_usage and obj.get("choices") == []:
                return False
        return True

    def _collect(self, obj: dict[str, Any]) -> None:
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and self._text_len < MAX_COLLECTED_TEXT:
                self._text.append(text)
                self._text_len += len(text)

    @property
    def text(self) -> str:
        return "".join(self._text)

    def finish(self) -> Usage:
        usage = self._usage
        if usage.completion_tokens is None:
            usage.completion_tokens = self.tokens
            if usage.tokens_source != "server":
                usage.tokens_source = "estimate"
        return usage


def usage_from_body(path: str, doc: Any) -> Usage:
    """Usage of a non-streaming OpenAI-style response body."""
    usage = Usage()
    if not isinstance(doc, dict):
        return usage
    u = doc.get("usage")
    if isinstance(u, dict):
        prompt = u.get("prompt_tokens", u.get("input_tokens"))
        completion = u.get("completion_tokens", u.get("output_tokens"))
        if completion is None and "total_tokens" in u and prompt is not None:
            completion = 0  # embeddings report prompt and total only
        usage.merge_server(prompt, completion)
    if path.endswith("/images/generations") and isinstance(doc.get("data"), list):
        usage.images = len(doc["data"])
    return usage


def stream_parser(
    path: str, content_type: str, plan: RequestPlan, collect_text: bool
) -> StreamUsage | None:
    """The SSE parser for OpenAI-style streams."""
    if content_type != "text/event-stream":
        return None
    return OpenAISSE(strip_usage=plan.inject_usage, collect_text=collect_text)
