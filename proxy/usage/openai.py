"""OpenAI-compatible usage capture (vLLM, llama.cpp server, transformers serve, TGI's /v1).

On the request side, a streaming chat or completion that did not ask for
``stream_options.include_usage`` gets it added, and the response parser then removes the
usage-only chunk (and any ``"usage":null`` the server adds to other chunks), so the client sees
exactly the stream it asked for. A request with vLLM's ``continuous_usage_stats`` is left as it
is: with ``include_usage`` added, usage would appear in every chunk. On the response side, usage
is read from whichever event carries it (the usage-only chunk, or the finish chunk as llama.cpp
sends it); servers that never send it fall back to counting the streamed deltas.

Beyond chat and completions: ``/v1/responses`` and Anthropic-style ``/v1/messages`` (named SSE
events; usage in ``response.completed``, or in ``message_start`` and ``message_delta``), images
(count, size, steps), audio (a WAV speech answer's seconds; a transcription's ``usage.seconds``),
rerank (``usage.total_tokens``) and score.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.usage.audio import WavStream
from proxy.usage.base import (
    ObservingStream,
    RequestPlan,
    SSEFramer,
    StreamUsage,
    Usage,
    int_field,
    parse_json,
    sse_data,
    weaker_source,
)
from proxy.usage.energy_splice import USAGE, FiguresFn, KeyPath, splice_event

STREAM_USAGE_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))
#: APIs whose streams are named events with usage nested in them.
#: ``stream_options`` that decide whether a stream carries usage (vLLM adds the second).
_USAGE_OPTIONS = ("include_usage", "continuous_usage_stats")
EVENT_STREAM_PATHS = frozenset(("/v1/responses", "/v1/messages"))
#: The Responses API's events that end a stream with the response's final usage (not
#: ``response.failed``: an error); the usage object in them.
_FINAL_RESPONSE_EVENTS = frozenset(("response.completed", "response.incomplete"))
_RESPONSE_USAGE: KeyPath = (b"response", b"usage")
#: Paths whose request body is JSON, whatever Content-Type the client sent (multipart uploads,
#: transcriptions and image edits, are not among them).
JSON_PATHS = frozenset(
    (
        *STREAM_USAGE_PATHS,
        *EVENT_STREAM_PATHS,
        "/v1/messages/count_tokens",
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/moderations",
        "/v1/rerank",
        "/v2/rerank",
        "/rerank",
        "/v1/score",
        "/score",
        "/v1/classify",
        "/classify",
        "/pooling",
        "/tokenize",
        "/detokenize",
        # llama.cpp server's native routes
        "/completion",
        "/embedding",
        "/infill",
    )
)
WAV_TYPES = frozenset(("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"))
#: Streamed text kept for counting with a tokenizer when the server sends no usage.
MAX_COLLECTED_TEXT = 1024 * 1024

#: A chunk's text: group 1 names the field, group 2 is set when the text is empty.
_PIECE = re.compile(rb'"(content|text)"\s*:\s*"(")?')
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
#: llama-server's ``"timings":`` key, and the decoder that finds where its value ends
_TIMINGS_MEMBER = re.compile(rb'"timings"\s*:\s*')
_JSON = json.JSONDecoder()
#: The chunk-level path (``OpenAISSE._count_whole_events``), on lines of whole events: a line's
#: first text piece and the rest of its line (so one match per line at most), group 1 set when
#: the piece is empty; the same for a ``"usage":null``.
_PIECE_LINE = re.compile(rb'"(?:content|text)"\s*:\s*"("?)[^\n]*')
_USAGE_NULL_LINE = re.compile(rb'"usage"\s*:\s*null[^\n]*')
#: A text that keeps a content event what it was, between the same bytes as the last one's: not
#: empty, no quote, no line end, and not a name the per-event path looks for.
_PLAIN_TEXT = re.compile(rb'(?!(?:usage|timings)\Z)[^"\r\n]+')
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
_INPUT_TOKENS = re.compile(rb'"(?:input_tokens|prompt_tokens)"\s*:\s*(\d+)')
_OUTPUT_TOKENS = re.compile(rb'"(?:output_tokens|completion_tokens)"\s*:\s*(\d+)')
_DELTA_EVENT = re.compile(rb'"type"\s*:\s*"(?:response\.output_text\.delta|content_block_delta)"')
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")  # not \d: it takes other scripts' digits
_DELTA_TEXT = re.compile(rb'"(?:delta|text)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts
    (``text`` in chat and Anthropic messages, ``input_text`` in the Responses API)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            c["text"]
            for c in content
            if isinstance(c, dict)
            and c.get("type") in ("text", "input_text", "output_text")
            and isinstance(c.get("text"), str)
        )
    return ""


def _list(value: Any) -> list[Any]:
    """``value`` if it is a list, else empty: clients and servers send anything."""
    return value if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _messages_of(path: str, doc: dict[str, Any]) -> list[dict[str, str]] | None:
    """The conversation as plain ``{"role", "content"}`` messages, for a chat template: chat
    messages, Anthropic messages with their ``system``, or a Responses ``input`` with its
    ``instructions``."""
    out: list[dict[str, str]] = []
    system = doc.get("instructions") if path == "/v1/responses" else doc.get("system")
    if path in ("/v1/messages", "/v1/responses") and system:
        out.append({"role": "system", "content": _text_of(system)})
    items = doc.get("messages")
    if path == "/v1/responses":
        items = doc.get("input")
        if isinstance(items, str):
            return [*out, {"role": "user", "content": items}]
    if not isinstance(items, list):
        return out or None
    for msg in items:
        if isinstance(msg, dict) and isinstance(msg.get("role"), str):
            out.append({"role": msg["role"], "content": _text_of(msg.get("content"))})
    return out or None


def _doc_texts(value: Any) -> list[str]:
    """Rerank documents: strings or ``{"text": ...}`` objects."""
    out: list[str] = []
    for d in value if isinstance(value, list) else [value]:
        if isinstance(d, str):
            out.append(d)
        elif isinstance(d, dict) and isinstance(d.get("text"), str):
            out.append(d["text"])
    return out


def _prompt_text(doc: dict[str, Any]) -> str:
    parts: list[str] = _strings(doc.get("prompt"))
    for key in ("input", "query", "text", "text_1", "text_2", "system"):
        parts.extend(_strings(doc.get(key)))
    parts.extend(_doc_texts(doc.get("documents")))
    for msg in _list(doc.get("messages")):
        if isinstance(msg, dict):
            text = _text_of(msg.get("content"))
            if text:
                parts.append(text)
    return "\n".join(parts)


def plan_openai_request(path: str, doc: Any) -> RequestPlan:
    """Read model, stream flag and prompt from a parsed JSON body; add include_usage if needed."""
    plan = RequestPlan()
    if not isinstance(doc, dict):
        return plan
    model = doc.get("model")
    plan.model = model if isinstance(model, str) else None
    plan.stream = doc.get("stream") is True
    messages = _messages_of(path, doc)
    if path in EVENT_STREAM_PATHS:
        plan.prompt_text = "\n".join(m["content"] for m in messages or () if m["content"])
    else:
        plan.prompt_text = _prompt_text(doc)
    plan.messages = messages
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens", "max_new_tokens"):
        value = int_field(doc.get(key))
        if value is not None:
            plan.max_tokens = value
            break
    if path.endswith("/images/generations") or path.endswith("/images/edits"):
        n = int_field(doc.get("n"))
        plan.images = n if n is not None and n > 0 else 1
        size = doc.get("size")
        if isinstance(size, str) and _SIZE.match(size):
            plan.extra["image_size"] = size
        steps = int_field(doc.get("num_inference_steps", doc.get("steps")))
        if steps is not None:
            plan.extra["steps"] = steps
    elif path.endswith("/rerank") or path.endswith("/score"):
        plan.prompt_parts = _pairs(doc)
    elif path.endswith("/embeddings") and isinstance(doc.get("input"), list):
        plan.prompt_parts = _strings(doc["input"]) or None
    user = doc.get("user")
    plan.end_user = user if isinstance(user, str) else None
    if plan.stream and path in STREAM_USAGE_PATHS and _may_ask_for_usage(doc.get("stream_options")):
        new_options = dict(doc.get("stream_options") or {})
        new_options["include_usage"] = True
        plan.inject_usage = True
        plan.body = json.dumps({**doc, "stream_options": new_options}).encode()
    options = doc.get("stream_options")
    plan.usage_asked = isinstance(options, dict) and options.get("include_usage") is True
    return plan


def _may_ask_for_usage(options: Any) -> bool:
    """Whether the proxy may add ``include_usage`` to a stream's options: only where the answer
    then differs from the one the client asked for by what ``OpenAISSE`` takes out again (the
    final usage-only chunk). Not when the client asked for usage itself (in whatever form), nor
    with vLLM's ``continuous_usage_stats``: vLLM honours it only together with
    ``include_usage`` and would then put usage in every chunk, and other servers (SGLang) honour
    it alone; either way the client's bytes could not be restored. Odd values the server might
    refuse are left for it to refuse."""
    if options is None:
        return True
    if not isinstance(options, dict):
        return False
    return all(options.get(key) is None or options.get(key) is False for key in _USAGE_OPTIONS)


def _pairs(doc: dict[str, Any]) -> list[str] | None:
    """Rerank and score requests: the server encodes one (query, document) pair per document;
    the pieces are counted one by one (a pair's joint special tokens are off by one or two)."""
    queries = _strings(doc.get("query", doc.get("text_1")))
    texts = _doc_texts(doc.get("documents", doc.get("text_2")))
    if not queries or not texts:
        return None
    if len(queries) == 1:
        return [p for t in texts for p in (queries[0], t)]
    return [p for q, t in zip(queries, texts, strict=False) for p in (q, t)]


def string_field(data: bytes, pattern: re.Pattern[bytes]) -> str | None:
    """The JSON string ``pattern`` finds (group 1: the raw literal), decoded on its own: a
    text delta is read without decoding the event around it."""
    m = pattern.search(data)
    if m is None:
        return None
    try:
        value = parse_json(b'"' + m.group(1) + b'"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def finish_stream(usage: Usage, chunks: int) -> Usage:
    """Usage at a stream's end. A missing completion count, or a zero one for a stream that
    carried text (the placeholder some servers send), becomes the count of text chunks."""
    if usage.completion_tokens is None or (usage.completion_tokens == 0 and chunks > 0):
        usage.completion_tokens = chunks
        usage.tokens_source = weaker_source(usage.tokens_source, "estimate")
    return usage


class OpenAISSE(StreamUsage):
    """Incremental parser of an OpenAI-style SSE response.

    Args:
        strip_usage: the proxy injected include_usage; remove what the client did not ask for.
        collect_text: keep streamed text (bounded) for counting with a tokenizer.
        strip_nulls: with ``strip_usage``, also remove the ``"usage":null`` that OpenAI adds to
            every chunk once usage is asked for; off for servers that always send it (TGI).
        chunk_path: count a chunk of whole plain content events with a few scans of the chunk
            (``_count_whole_events``); off, every event takes the per-event path (the
            reference the chunk path is tested against).
        energy: the client asked for usage and for energy in it (issue 15): the final
            usage-only chunk (``"choices":[]``) gets the figures ``energy()`` gives then
            (``energy_splice``); every other byte passes unchanged.
    """

    def __init__(
        self,
        strip_usage: bool = False,
        collect_text: bool = False,
        strip_nulls: bool = True,
        chunk_path: bool = True,
        energy: FiguresFn | None = None,
    ) -> None:
        self.strip_usage = strip_usage
        self.energy = energy
        #: the client gets the events as framed here, not the chunks as they came
        self._reframes = strip_usage or energy is not None
        self._final_usage = False  # the event just inspected is the final usage-only chunk
        self.strip_nulls = strip_nulls
        self.collect_text = collect_text
        # collected text needs each event's JSON: no chunk path then
        self._chunk_path = chunk_path and not collect_text
        #: the bytes before and after the text of the last one-event chunk counted whole
        self._like = (b"", b"")
        #: with ``strip_usage``: a finish event held until the next one shows whether it is the
        #: injected usage chunk, whose ``timings`` (llama-server) go back into it
        self._held: bytes | None = None
        self.tokens = 0
        self.done = False
        self.events = 0
        self._framer = SSEFramer()
        self._usage = Usage()
        self._timings: Usage | None = None
        self._text: list[str] = []
        self._text_len = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._chunk_path and self._held is None and self._count_whole_events(chunk):
            return chunk
        if not self._reframes:
            for event in self._framer.push(chunk):
                self._inspect(event)
            return chunk
        strip_nulls = self.strip_usage and self.strip_nulls
        out = []
        for event in self._framer.push(chunk):
            keep = self._inspect(event)
            if self._held is not None:
                held, self._held = self._held, None
                out.append(held if keep else with_timings_of(held, event))
            if keep:
                if strip_nulls and b"null" in event and b'"usage"' in event:
                    event = _USAGE_NULL.sub(b"", event)
                if self._final_usage and self.energy is not None:
                    self._final_usage = False
                    event = splice_event(event, self.energy)
                if self.strip_usage and _FINISHED.search(event):
                    self._held = event  # asked for usage, llama-server moves its timings
                    continue
                out.append(event)
        return b"".join(out)

    def _count_whole_events(self, chunk: bytes) -> bool:
        r"""The chunk-level path: count a chunk of plain content events, one token each, with a
        few scans of the whole chunk and no framing or decoding; False, with nothing counted,
        for a chunk it is not sure of, which then takes the per-event path.

        Sure means: nothing is held back from an earlier chunk; the chunk is whole events, each
        one ``data:`` line (no ``\r``; as many newlines as twice the pairs followed by
        ``data:``, plus the final pair: so every newline is in one of those pairs); no
        ``"timings"``; no ``"usage"``, unless each event has exactly one, a ``"usage":null``
        that stays in place; and every event's first text piece is a non-empty string. The
        per-event path then passes the chunk through unchanged and counts one token per event
        (``generated_token``: only an empty piece depends on its neighbours), neither
        ``[DONE]`` nor role-only nor finish-only events being among them. A ``_PIECE_LINE``
        match cannot run past its line: each pair of newlines is followed by ``data:`` or the
        end, and a newline in ``\s*`` would have to be followed by ``:`` or ``"``.

        Servers send one event per chunk mostly, with the same bytes around each text (vLLM,
        llama.cpp, TGI): a chunk of one event that passed keeps them (``_like``), and the next
        chunk that is those bytes around a plain text (``_PLAIN_TEXT``) is the same kind of
        event. The text adds no quote, line end or key: a ``"usage"`` or ``"timings"`` it could
        make with the quotes around it is ruled out by name."""
        if self._framer._buf:
            return False
        head, tail = self._like
        if (
            head
            and chunk.startswith(head)
            and chunk.endswith(tail)
            and _PLAIN_TEXT.fullmatch(chunk, len(head), len(chunk) - len(tail)) is not None
        ):
            self.events += 1
            self.tokens += 1
            return True
        if not chunk.startswith(b"data:") or not chunk.endswith(b"\n\n") or b"\r" in chunk:
            return False
        newlines = chunk.count(b"\n")
        n = newlines // 2
        if newlines != 2 * n or (n > 1 and chunk.count(b"\n\ndata:") != n - 1):
            return False
        if b'"timings"' in chunk:
            return False
        if self.strip_usage and _FINISHED.search(chunk):  # held back by the per-event path
            return False
        if b'"usage"' in chunk and (
            (self.strip_usage and self.strip_nulls)  # those nulls are cut out
            or chunk.count(b'"usage"') != n
            or len(_USAGE_NULL_LINE.findall(chunk)) != n
        ):
            return False
        if n == 1:
            m = _PIECE_LINE.search(chunk)
            if m is None or m.group(1):
                return False
            text_at = m.start(1)
            text_end = chunk.find(b'"', text_at)
            if text_end > 0 and _PLAIN_TEXT.fullmatch(chunk, text_at, text_end) is not None:
                self._like = (chunk[:text_at], chunk[text_end:])
        else:
            pieces = _PIECE_LINE.findall(chunk)
            if len(pieces) != n or b'"' in pieces:
                return False
        self.events += n
        self.tokens += n
        return True

    def flush(self) -> bytes:
        rest = self._framer.pending()
        held, self._held = self._held, None
        if not self._reframes:
            if rest:
                self._inspect(rest)
            return b""
        keep = self._inspect(rest) if rest else True
        out = b"" if held is None else held if keep else with_timings_of(held, rest)
        return out + rest if rest and keep else out

    def _inspect(self, event: bytes) -> bool:
        """Account one event; False when it is the injected usage-only chunk."""
        data = sse_data(event)
        if data is None:
            return True
        self.events += 1
        if data.strip() == b"[DONE]":
            self.done = True
            return True
        token, content = generated_token(data)
        self.tokens += token
        has_usage = b'"usage"' in data and not (
            b"null" in data and _USAGE_NULL.search(data) and data.count(b'"usage"') == 1
        )
        has_timings = b'"timings"' in data
        if not has_usage and not has_timings and not (content and self.collect_text):
            return True
        try:
            obj = parse_json(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        if content and self.collect_text:
            self._collect(obj)
        timings = obj.get("timings")
        if isinstance(timings, dict):
            self._timings = _timings_usage(timings) or self._timings
        usage = obj.get("usage")
        if isinstance(usage, dict):
            _merge_usage(self._usage, usage)
            if obj.get("choices") == []:
                if self.strip_usage:
                    return False
                self._final_usage = True
        return True

    def _collect(self, obj: dict[str, Any]) -> None:
        for choice in _list(obj.get("choices")):
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
        if self._timings is not None:
            self._usage.fill_from(self._timings)
        return finish_stream(self._usage, self.tokens)


def with_timings_of(finish_event: bytes, usage_event: bytes) -> bytes:
    """``finish_event`` with the ``"timings"`` of the usage chunk the proxy strips put back as
    its last key, where llama-server puts them when no usage was asked for; unchanged when
    that chunk has none. The member's bytes are copied as sent."""
    m = _TIMINGS_MEMBER.search(usage_event)
    close = finish_event.rfind(b"}")
    if m is None or close < 0:
        return finish_event
    try:  # a UnicodeDecodeError is a ValueError too
        rest = usage_event[m.end() :].decode("utf-8")
        _, value_end = _JSON.raw_decode(rest)
    except ValueError:
        return finish_event
    value = rest[:value_end].encode("utf-8")
    return finish_event[:close] + b"," + m.group() + value + finish_event[close:]


def generated_token(data: bytes) -> tuple[int, bool]:
    """Whether one chunk's ``data`` is a generated token (1 or 0), and whether it has text.

    Servers stream one token per chunk, text or not: a token whose bytes are held back
    (incomplete UTF-8: llama-cpp-python, vLLM) or that has no text (vLLM's end of sequence)
    comes as ``"content":""``. An empty ``content`` beside a ``role`` announces the role, and a
    completion's empty ``text`` beside a ``finish_reason`` marks the end: neither is a token.
    Read from the bytes, without decoding the chunk."""
    m = _PIECE.search(data)
    if m is None:
        return 0, False
    if m.group(2) is None:
        return 1, True
    if m.group(1) == b"content":
        return (0 if b'"role"' in data else 1), False
    return (0 if _FINISHED.search(data) else 1), False


def _timings_usage(timings: dict[str, Any]) -> Usage | None:
    """llama.cpp's ``timings``: ``predicted_n`` generated, ``prompt_n`` prompt tokens evaluated
    plus ``cache_n`` taken from the cache."""
    predicted = int_field(timings.get("predicted_n"))
    prompt = int_field(timings.get("prompt_n"))
    if predicted is None and prompt is None:
        return None
    usage = Usage()
    cached = int_field(timings.get("cache_n")) or 0
    usage.merge_server(None if prompt is None else prompt + cached, predicted)
    return usage


def _merge_usage(usage: Usage, u: dict[str, Any]) -> None:
    """Token counts of an OpenAI ``usage`` object, whichever names it uses."""
    if u.get("type") == "duration":  # a transcription's audio length
        seconds = u.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool):
            usage.audio_s = float(seconds)
        return
    prompt = u.get("prompt_tokens", u.get("input_tokens"))
    completion = u.get("completion_tokens", u.get("output_tokens"))
    if completion is None and prompt is None and "total_tokens" in u:
        prompt, completion = u["total_tokens"], 0  # rerank reports the total only
    elif completion is None and prompt is not None and "total_tokens" in u:
        completion = 0  # embeddings report prompt and total only
    usage.merge_server(prompt, completion)


def _final_usage_at(kind: Any, obj: dict[str, Any]) -> KeyPath | None:
    """Where an event that ends a named-event stream holds its final usage object."""
    if kind in _FINAL_RESPONSE_EVENTS:
        response = obj.get("response")
        if isinstance(response, dict) and isinstance(response.get("usage"), dict):
            return _RESPONSE_USAGE
    elif kind == "message_delta" and isinstance(obj.get("usage"), dict):
        return USAGE
    return None


class EventSSE(ObservingStream):
    """Incremental parser of a stream of named events: ``/v1/responses`` and ``/v1/messages``.

    Usage is read from the events that carry it (``response.completed`` and its siblings;
    ``message_start`` and ``message_delta``), later ones winning. Only events that mention
    ``usage`` (or text deltas, when text is collected) are decoded; one too large to decode is
    searched for its token counts instead.

    With ``energy``, the final usage gains the figures: ``response.usage`` of
    ``response.completed`` (or ``response.incomplete``), the ``usage`` of ``message_delta``.
    ``message_start``'s usage is the prompt's, before any generation, and ``response.failed``
    is an error: neither is touched.
    """

    def __init__(self, collect_text: bool = False, energy: FiguresFn | None = None) -> None:
        super().__init__(energy)
        self.collect_text = collect_text
        self.tokens = 0
        self.events = 0
        self._usage = Usage()
        self._text: list[str] = []
        self._text_len = 0

    def inspect(self, event: bytes) -> None:
        data = sse_data(event)
        if data is None:
            if self._framer.oversize and b'"usage"' in event:
                self._scan_counts(event)
            return
        self.events += 1
        delta = _DELTA_EVENT.search(data) is not None
        if delta:
            self.tokens += 1
        has_usage = b'"usage"' in data and (
            b'"input_tokens"' in data or b'"output_tokens"' in data or b'"prompt_tokens"' in data
        )
        if delta and self.collect_text:
            self._collect(data)
        if not has_usage:
            return
        try:
            obj = parse_json(data)
        except ValueError:
            self._scan_counts(data)
            return
        if isinstance(obj, dict):
            holder = obj.get("response") or obj.get("message") or obj
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if not isinstance(usage, dict):
                usage = obj.get("usage")
            if isinstance(usage, dict):
                kind = obj.get("type")
                if kind == "message_start":  # its output count is a placeholder
                    usage = {"input_tokens": usage.get("input_tokens")}
                _merge_usage(self._usage, usage)
                self.splice_at = _final_usage_at(kind, obj)

    def _scan_counts(self, data: bytes) -> None:
        at = data.rfind(b'"usage"')
        tail = data[at:]
        prompt = _INPUT_TOKENS.search(tail)
        completion = _OUTPUT_TOKENS.search(tail)
        self._usage.merge_server(
            int(prompt.group(1)) if prompt else None,
            int(completion.group(1)) if completion else None,
        )

    def _collect(self, data: bytes) -> None:
        text = string_field(data, _DELTA_TEXT)
        if text is not None and self._text_len < MAX_COLLECTED_TEXT:
            self._text.append(text)
            self._text_len += len(text)

    @property
    def text(self) -> str:
        return "".join(self._text)

    def finish(self) -> Usage:
        return finish_stream(self._usage, self.tokens)


def _generated_text(doc: dict[str, Any]) -> str | None:
    """The text of a response that reported no usage: choices, a Responses ``output``, an
    Anthropic ``content``, a transcription's ``text``."""
    parts: list[str] = []
    for choice in _list(doc.get("choices")):
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str):
                parts.append(text)
    for item in _list(doc.get("output")):
        if isinstance(item, dict):
            parts.append(_text_of(item.get("content")))
    if isinstance(doc.get("content"), list):
        parts.append(_text_of(doc["content"]))
    if isinstance(doc.get("text"), str):
        parts.append(doc["text"])
    return "".join(parts) if parts else None


def usage_from_body(path: str, doc: Any) -> Usage:
    """Usage of a non-streaming OpenAI-style response body."""
    usage = Usage()
    if not isinstance(doc, dict):
        return usage
    u = doc.get("usage")
    if isinstance(u, dict):
        _merge_usage(usage, u)
    meta = doc.get("meta")
    if usage.prompt_tokens is None and isinstance(meta, dict):  # Cohere-style rerank
        tokens = meta.get("tokens")
        if isinstance(tokens, dict):
            usage.merge_server(tokens.get("input_tokens"), tokens.get("output_tokens", 0))
    if "/images/" in path and isinstance(doc.get("data"), list):
        usage.images = len(doc["data"])
    if usage.completion_tokens in (None, 0) and not path.endswith(
        ("/embeddings", "/rerank", "/score")
    ):
        text = _generated_text(doc)
        if usage.completion_tokens is None or text:  # a zero count for a text is a placeholder
            usage.completion_tokens = None
            usage.generated_text = text
    return usage


def stream_parser(
    path: str, content_type: str, plan: RequestPlan, collect_text: bool
) -> StreamUsage | None:
    """The parser for a streamed answer: SSE chunks, named SSE events, or WAV audio."""
    if content_type in WAV_TYPES:
        return WavStream()
    if content_type != "text/event-stream":
        return None
    if path in EVENT_STREAM_PATHS:
        return EventSSE(collect_text=collect_text, energy=plan.energy)
    return OpenAISSE(
        strip_usage=plan.inject_usage, collect_text=collect_text, energy=energy_of(plan)
    )


def energy_of(plan: RequestPlan) -> FiguresFn | None:
    """The figures for a stream's final usage chunk: only where the client asked for usage
    itself (``stream_options.include_usage``) and for energy in it."""
    return plan.energy if plan.usage_asked else None
