"""Usage capture for Ollama's native API.

``/api/generate`` and ``/api/chat`` stream by default (``"stream": false`` turns it off) as
newline-delimited JSON (``application/x-ndjson``): one object per token with ``"done":false``,
then a final ``"done":true`` object with ``prompt_eval_count``, ``eval_count`` and durations in
nanoseconds (``total_duration``, ``load_duration``, ``prompt_eval_duration``,
``eval_duration``). Ollama omits zero counts, so a fully cached prompt has no
``prompt_eval_count``: the prompt is then counted with the tokenizer. ``/api/embed`` answers
``prompt_eval_count`` too. The OpenAI routes (``/v1/...``) are parsed as OpenAI.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.usage import openai
from proxy.usage.base import (
    NDJSONFramer,
    ObservingStream,
    RequestPlan,
    StreamUsage,
    Usage,
    int_field,
    parse_json,
)
from proxy.usage.energy_splice import FiguresFn, KeyPath, UsageSplicer

NDJSON_TYPES = frozenset(("application/x-ndjson", "application/jsonl", "application/json-seq"))
GENERATE_PATHS = frozenset(("/api/generate", "/api/chat"))
#: Paths whose request body is JSON, whatever Content-Type the client sent.
JSON_PATHS = (
    frozenset((*GENERATE_PATHS, "/api/embed", "/api/embeddings", "/api/show", "/v1/embeddings"))
    | openai.STREAM_USAGE_PATHS
)
#: Final-object durations, in nanoseconds on the wire, recorded in seconds.
DURATIONS_NS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
NS_PER_S = 1e9

_DONE = re.compile(rb'"done"\s*:\s*true')
#: Energy in the answer: the ``done`` line (or a non-streamed answer) itself, whose counts are
#: top-level members.
DONE_LINE: KeyPath = ()
#: Non-streamed answers with counts at the top level (``/api/embeddings`` reports none).
COUNTED_PATHS = frozenset((*GENERATE_PATHS, "/api/embed"))
_CONTENT = re.compile(rb'"(?:response|content|thinking)"\s*:\s*"(?!")')
_TEXT = re.compile(rb'"(?:response|content)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _prompt(path: str, doc: dict[str, Any], plan: RequestPlan) -> None:
    parts: list[str] = []
    for key in ("system", "prompt", "suffix"):
        if isinstance(doc.get(key), str):
            parts.append(doc[key])
    messages = doc.get("messages")
    if isinstance(messages, list):
        plan.messages = [
            {"role": m["role"], "content": m.get("content") or ""}
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("role"), str)
        ]
        parts.extend(m["content"] for m in plan.messages if isinstance(m["content"], str))
    inputs = doc.get("input")
    if isinstance(inputs, str):
        parts.append(inputs)
    elif isinstance(inputs, list):
        plan.prompt_parts = [x for x in inputs if isinstance(x, str)] or None
        parts.extend(plan.prompt_parts or ())
    plan.prompt_text = "\n".join(parts)


def plan_request(path: str, doc: Any) -> RequestPlan:
    if path.startswith("/v1/"):
        return openai.plan_openai_request(path, doc)
    plan = RequestPlan()
    if not isinstance(doc, dict):
        return plan
    if isinstance(doc.get("model"), str):
        plan.model = doc["model"]
    # Ollama streams unless told not to
    plan.stream = path in GENERATE_PATHS and doc.get("stream") is not False
    if path in COUNTED_PATHS:
        plan.usage_at = DONE_LINE
    options = doc.get("options")
    if isinstance(options, dict):
        n = int_field(options.get("num_predict"))
        plan.max_tokens = n if n is not None and n >= 0 else None
    _prompt(path, doc, plan)
    return plan


def _final(usage: Usage, obj: dict[str, Any]) -> None:
    """Counts and durations of a ``done`` object (or of a non-streaming answer)."""
    prompt = int_field(obj.get("prompt_eval_count"))
    completion = int_field(obj.get("eval_count"))
    if completion is None and obj.get("done") is True and "embeddings" not in obj:
        completion = 0  # omitted when zero
    usage.merge_server(prompt, completion)
    for key in DURATIONS_NS:
        ns = int_field(obj.get(key))
        if ns is not None:
            usage.extra[key + "_s"] = ns / NS_PER_S
    reason = obj.get("done_reason")
    if isinstance(reason, str):
        usage.extra["done_reason"] = reason


class OllamaStream(ObservingStream):
    """Incremental parser of an NDJSON answer: counts content lines, decodes only the ``done``
    line (and, when text is collected, the content string of each line). With ``energy``, the
    ``done`` line gains the figures as top-level members, beside Ollama's own counts (it has
    no ``usage`` object)."""

    framer_class = NDJSONFramer

    def __init__(self, collect_text: bool = False, energy: FiguresFn | None = None) -> None:
        super().__init__(energy)
        self.collect_text = collect_text
        self.tokens = 0
        self.lines = 0
        self.done = False
        self._usage = Usage()
        self._text: list[str] = []
        self._text_len = 0

    def inspect(self, line: bytes) -> None:
        self.lines += 1
        final = _DONE.search(line) is not None
        content = _CONTENT.search(line) is not None
        if content and not final:
            self.tokens += 1
        if content and self.collect_text and not final:
            text = openai.string_field(line, _TEXT)
            if text is not None and self._text_len < openai.MAX_COLLECTED_TEXT:
                self._text.append(text)
                self._text_len += len(text)
        if not final:
            return
        try:
            obj = parse_json(line)
        except ValueError:
            return
        if isinstance(obj, dict):
            self.done = True
            _final(self._usage, obj)
            if obj.get("done") is True:
                self.splice_at = DONE_LINE

    def splice(self, frame: bytes, path: KeyPath, energy: FiguresFn) -> bytes:
        """The ``done`` line with the figures as its last members."""
        return UsageSplicer(energy, path=path).feed(frame)

    @property
    def text(self) -> str:
        return "".join(self._text)

    def finish(self) -> Usage:
        return openai.finish_stream(self._usage, self.tokens)


def stream_parser(
    path: str, content_type: str, plan: RequestPlan, collect_text: bool
) -> StreamUsage | None:
    if path.startswith("/v1/"):
        return openai.stream_parser(path, content_type, plan, collect_text)
    if content_type not in NDJSON_TYPES:
        return None
    energy = plan.energy if path in GENERATE_PATHS else None
    return OllamaStream(collect_text=collect_text, energy=energy)


def usage_from_body(path: str, doc: Any) -> Usage:
    if path.startswith("/v1/"):
        return openai.usage_from_body(path, doc)
    usage = Usage()
    if not isinstance(doc, dict):
        return usage
    if path in ("/api/embed", "/api/embeddings"):
        prompt = int_field(doc.get("prompt_eval_count"))
        if prompt is not None:
            usage.merge_server(prompt, 0)
        else:
            usage.completion_tokens = 0
        return usage
    _final(usage, doc)
    if usage.completion_tokens is None:
        message = doc.get("message")
        text = message.get("content") if isinstance(message, dict) else doc.get("response")
        usage.generated_text = text if isinstance(text, str) else None
    return usage
