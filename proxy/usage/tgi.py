"""Usage capture for Hugging Face text-generation-inference (TGI).

Native routes: ``/generate`` answers ``{"generated_text", "details"}`` (``details`` only when
``parameters.details`` is true; ``details.prefill`` holds the prompt tokens only with
``decoder_input_details``), ``/`` answers the same wrapped in a list (or streams when
``"stream": true``), and ``/generate_stream`` sends one SSE event per generated token,
``data:{"index":..,"token":{..},"generated_text":null,"details":null}``, the last one carrying
``generated_text`` and, when asked, ``details`` (``generated_tokens``, and ``input_length`` in
TGI 2 and later). Non-streaming answers also carry ``x-prompt-tokens`` and
``x-generated-tokens`` headers. The OpenAI routes (``/v1/...``) are parsed as OpenAI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from estimators.units import parse_count
from proxy.usage import openai
from proxy.usage.base import (
    ObservingStream,
    RequestPlan,
    StreamUsage,
    Usage,
    int_field,
    parse_json,
    sse_data,
)
from proxy.usage.energy_splice import FiguresFn, KeyPath

STREAM_PATHS = frozenset(("/generate_stream",))
#: Paths whose request body is JSON, whatever Content-Type the client sent.
JSON_PATHS = frozenset(
    ("/", "/generate", *STREAM_PATHS, "/tokenize", "/chat_tokenize", *openai.STREAM_USAGE_PATHS)
)
_TOKEN = re.compile(rb'"token"\s*:\s*\{')
#: Energy in the answer: the final event's ``details``, where TGI reports its counts.
DETAILS: KeyPath = (b"details",)
_FINAL = re.compile(rb'"generated_text"\s*:\s*"|"details"\s*:\s*\{')


def plan_request(path: str, doc: Any) -> RequestPlan:
    """``{"inputs", "parameters", "stream"}`` on native routes; OpenAI bodies on ``/v1``."""
    if path.startswith("/v1/"):
        return openai.plan_openai_request(path, doc)
    plan = RequestPlan()
    if not isinstance(doc, dict):
        return plan
    inputs = doc.get("inputs")
    plan.prompt_text = inputs if isinstance(inputs, str) else ""
    params = doc.get("parameters")
    params = params if isinstance(params, dict) else {}
    plan.max_tokens = int_field(params.get("max_new_tokens"))
    plan.stream = path in STREAM_PATHS or (path == "/" and doc.get("stream") is True)
    if path == "/generate":  # "/" answers a list, which is not spliced
        plan.usage_at = DETAILS
    if isinstance(doc.get("model"), str):
        plan.model = doc["model"]
    return plan


class TGIStream(ObservingStream):
    """Incremental parser of ``/generate_stream``: one event is one generated token; the last
    event's ``details`` (when the client asked for them) holds the server's counts, and, with
    ``energy``, gains the figures (no ``details``, no figures: the client asked for no counts)."""

    def __init__(self, energy: FiguresFn | None = None) -> None:
        super().__init__(energy)
        self.tokens = 0
        self.events = 0
        self.generated_text: str | None = None
        self._usage = Usage()

    def inspect(self, event: bytes) -> None:
        data = sse_data(event)
        if data is None:
            return
        self.events += 1
        if _TOKEN.search(data) is None:
            return  # an error event, or a keep-alive
        self.tokens += 1
        if _FINAL.search(data) is None:
            return
        try:
            obj = parse_json(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        text = obj.get("generated_text")
        if isinstance(text, str):
            self.generated_text = text
        details = obj.get("details")
        if isinstance(details, dict):
            self._usage.merge_server(
                int_field(details.get("input_length")), int_field(details.get("generated_tokens"))
            )
            self.splice_at = DETAILS

    def finish(self) -> Usage:
        usage = self._usage
        if usage.completion_tokens is None:
            # each token event is one token the server generated and reported
            usage.completion_tokens = self.tokens
            usage.tokens_source = "server" if self.tokens else usage.tokens_source
        return usage


def stream_parser(
    path: str, content_type: str, plan: RequestPlan, collect_text: bool
) -> StreamUsage | None:
    if path.startswith("/v1/"):
        if content_type == "text/event-stream" and path in openai.STREAM_USAGE_PATHS:
            # TGI puts "usage":null on every chunk, asked or not: leave those in place
            return openai.OpenAISSE(
                plan.inject_usage, collect_text, strip_nulls=False, energy=openai.energy_of(plan)
            )
        return openai.stream_parser(path, content_type, plan, collect_text)
    if content_type != "text/event-stream":
        return None
    return TGIStream(energy=plan.energy)


def usage_from_body(path: str, doc: Any) -> Usage:
    """``/generate`` (an object) or ``/`` (a list of one)."""
    if path.startswith("/v1/"):
        return openai.usage_from_body(path, doc)
    usage = Usage()
    if isinstance(doc, list) and doc:
        doc = doc[0]
    if not isinstance(doc, dict):
        return usage
    details = doc.get("details")
    if isinstance(details, dict):
        prefill = details.get("prefill")
        prompt = len(prefill) if isinstance(prefill, list) and prefill else None
        usage.merge_server(prompt, int_field(details.get("generated_tokens")))
    text = doc.get("generated_text")
    if usage.completion_tokens is None and isinstance(text, str):
        usage.generated_text = text
    return usage


def usage_from_headers(path: str, headers: Mapping[str, str]) -> Usage | None:
    """``x-prompt-tokens`` and ``x-generated-tokens``, set on TGI's non-streaming answers."""
    prompt = headers.get("x-prompt-tokens")
    generated = headers.get("x-generated-tokens")
    if prompt is None and generated is None:
        return None
    usage = Usage()
    usage.merge_server(parse_count(prompt), parse_count(generated))
    return usage if usage.tokens_source == "server" else None
