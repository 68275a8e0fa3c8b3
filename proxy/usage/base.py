"""Shared pieces of the usage parsers: the ``Usage`` result, SSE event framing, and a bounded
non-streaming body collector. Nothing here touches a socket."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.usage.energy_splice import USAGE, FiguresFn, KeyPath, splice_event

try:  # orjson is optional: it decodes several times faster
    import orjson

    def parse_json(data: bytes | str) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - exercised only without the extra

    def parse_json(data: bytes | str) -> Any:
        return json.loads(data)


#: The largest single SSE event kept for parsing; a bigger one is forwarded but not inspected.
MAX_EVENT_BYTES = 1024 * 1024
#: The largest non-streaming body kept for parsing usage; past it only the tail is searched.
MAX_BODY_BYTES = 16 * 1024 * 1024
TAIL_BYTES = 64 * 1024
#: How certain each ``tokens_source`` is; a mix of two reports the less certain.
SOURCE_RANK = {"server": 3, "tokenizer": 2, "estimate": 1, "none": 0}


def weaker_source(a: str, b: str) -> str:
    """The less certain of two ``tokens_source`` values (``none`` counts as absent)."""
    if a == "none":
        return b
    if b == "none":
        return a
    return a if SOURCE_RANK.get(a, 0) <= SOURCE_RANK.get(b, 0) else b


@dataclass(slots=True)
class Usage:
    """Token counts of one request and where they came from.

    ``tokens_source``: ``server`` (reported by the upstream), ``tokenizer`` (counted with the
    model's tokenizer), ``estimate`` (chunk count or bytes/4), ``none`` (nothing to count).
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_source: str = "none"
    images: int | None = None
    audio_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Text the server generated without counting it, for a tokenizer (or an estimate).
    generated_text: str | None = None
    #: The model named in a streamed request body (a multipart form field), known only at the end.
    model: str | None = None

    def record_fields(self) -> dict[str, Any]:
        """What a request record keeps beyond token counts: audio seconds, images, ``extra``."""
        out: dict[str, Any] = {}
        if self.audio_s is not None:
            out["audio_s"] = round(self.audio_s, 3)
        if self.images is not None:
            out["images"] = self.images
        out.update(self.extra)
        return out

    def fill_from(self, other: Usage) -> None:
        """Take the counts ``other`` has and this one lacks (e.g. from response headers); the
        source becomes the less certain of the two when both contributed."""
        took = False
        if self.prompt_tokens is None and other.prompt_tokens is not None:
            self.prompt_tokens = other.prompt_tokens
            took = True
        if self.completion_tokens is None and other.completion_tokens is not None:
            self.completion_tokens = other.completion_tokens
            took = True
        if took:
            self.tokens_source = weaker_source(self.tokens_source, other.tokens_source)
        if self.audio_s is None:
            self.audio_s = other.audio_s
        if self.images is None:
            self.images = other.images

    def merge_server(self, prompt: Any, completion: Any) -> None:
        if isinstance(prompt, int | float) and not isinstance(prompt, bool):
            self.prompt_tokens = int(prompt)
            self.tokens_source = "server"
        if isinstance(completion, int | float) and not isinstance(completion, bool):
            self.completion_tokens = int(completion)
            self.tokens_source = "server"


@dataclass(slots=True)
class RequestPlan:
    """What the proxy learned from a JSON request body, and the body to send upstream
    (``body`` is set only when the proxy had to change it, e.g. to ask for usage)."""

    model: str | None = None
    stream: bool = False
    inject_usage: bool = False
    body: bytes | None = None  # replacement body, when it had to change
    prompt_text: str = ""
    messages: list[Any] | None = None
    max_tokens: int | None = None
    images: int | None = None
    end_user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Prompt pieces the server tokenizes one by one (a batch of inputs, rerank pairs).
    prompt_parts: list[str] | None = None
    #: Watches a streamed (non-JSON) upload, e.g. the audio of a transcription.
    upload: UploadProbe | None = None
    #: The client asked for usage in its stream itself (``stream_options.include_usage``).
    usage_asked: bool = False
    #: Energy in the answer (``response.energy_in_usage``): the request's figures as they
    #: stand, set by the proxy once the request is open; None when not asked for.
    energy: FiguresFn | None = None
    #: Where a non-streamed JSON answer reports its counts, the object that gets the figures:
    #: the top-level ``usage``, TGI's ``details``, or (empty) Ollama's answer itself.
    usage_at: KeyPath = USAGE


class UploadProbe(Protocol):
    """An incremental observer of a request body that streams through (bounded memory)."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Usage: ...


class StreamUsage:
    """Interface of an incremental response parser.

    ``feed`` takes the upstream's bytes and returns what the client gets (usually the same
    object); ``tokens`` counts generated tokens seen so far (for work weighting); ``finish``
    returns the usage once the body has ended, possibly early (a disconnect).
    """

    tokens: int = 0
    #: Energy in the answer (issue 15): the figures for the stream's final usage, when the
    #: client asked for them; None (the proxy sets it so for an error answer) adds nothing.
    energy: FiguresFn | None = None

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        """Bytes still held back (an incomplete last event) when the stream ends."""
        return b""

    def finish(self) -> Usage:
        return Usage()

    @property
    def text(self) -> str:
        """Generated text collected for counting with a tokenizer (empty if not collected)."""
        return ""


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class Framer:
    """Splits a byte stream into complete frames (each with its terminator), bounded.

    A frame larger than ``max_frame_bytes`` is returned as-is in pieces with ``oversize`` set,
    so nothing is ever buffered without bound. Subclasses set ``terminator``.
    """

    __slots__ = ("_buf", "max_frame_bytes", "oversize")
    terminator: re.Pattern[bytes]

    def __init__(self, max_frame_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buf = b""
        self.max_frame_bytes = max_frame_bytes
        self.oversize = False

    def push(self, chunk: bytes) -> Iterator[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        search = self.terminator.search
        while True:
            m = search(buf, start)
            if m is None:
                break
            yield buf[start : m.end()]
            start = m.end()
        rest = buf[start:]
        if len(rest) > self.max_frame_bytes:
            self.oversize = True
            self._buf = b""
            yield rest
        else:
            self._buf = rest

    def pending(self) -> bytes:
        out, self._buf = self._buf, b""
        return out


class SSEFramer(Framer):
    """Server-sent events: frames end with a blank line (``\n\n``, ``\r\n\r\n``, ``\r\r``)."""

    __slots__ = ()
    terminator = _EVENT_END

    def push(self, chunk: bytes) -> Iterator[bytes]:
        """As ``Framer.push``; without a ``\r`` only ``\n\n`` can end a frame, and splitting on
        it costs a fifth of the regex loop (this runs for every streamed chunk)."""
        if b"\r" in chunk or b"\r" in self._buf:
            return Framer.push(self, chunk)
        buf = self._buf + chunk if self._buf else chunk
        end = buf.find(b"\n\n")
        if end >= 0 and end == len(buf) - 2:  # the usual chunk: one whole event
            self._buf = b""
            return iter((buf,))
        frames = buf.split(b"\n\n")
        rest = frames.pop()
        out = [f + b"\n\n" for f in frames]
        if len(rest) > self.max_frame_bytes:
            self.oversize = True
            self._buf = b""
            out.append(rest)
        else:
            self._buf = rest
        return iter(out)


class NDJSONFramer(Framer):
    """Newline-delimited JSON (Ollama): frames end with ``\n``."""

    __slots__ = ()
    terminator = re.compile(rb"\n")


class ObservingStream(StreamUsage):
    """A parser that watches: each complete frame is handed to ``inspect``, and the client gets
    the upstream's bytes unchanged. With ``energy`` set, the frames go out as framed, and the
    one ``inspect`` marks as the final usage (``splice_at``: where in it) gains the figures."""

    framer_class: type[Framer] = SSEFramer

    def __init__(self, energy: FiguresFn | None = None) -> None:
        self._framer = self.framer_class()
        self.energy = energy
        #: set by ``inspect``: the frame just inspected holds the final usage, at this key path
        self.splice_at: KeyPath | None = None

    def inspect(self, frame: bytes) -> None:
        """Account one complete frame (or the unterminated rest at the end)."""

    def splice(self, frame: bytes, path: KeyPath, energy: FiguresFn) -> bytes:
        """``frame`` with the figures in its object at ``path``: an SSE event's data."""
        return splice_event(frame, energy, path)

    def feed(self, chunk: bytes) -> bytes:
        if self.energy is None:
            for frame in self._framer.push(chunk):
                self.inspect(frame)
            return chunk
        return b"".join(self._relay(frame) for frame in self._framer.push(chunk))

    def _relay(self, frame: bytes) -> bytes:
        self.inspect(frame)
        path, self.splice_at = self.splice_at, None
        if path is None or self.energy is None:
            return frame
        return self.splice(frame, path, self.energy)

    def flush(self) -> bytes:
        rest = self._framer.pending()
        if self.energy is None:
            if rest.strip():
                self.inspect(rest)
            return b""
        return self._relay(rest) if rest.strip() else rest


def int_field(value: Any) -> int | None:
    """A JSON integer, or None for anything else (booleans included: JSON's true is no count)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def sse_data(event: bytes) -> bytes | None:
    """The joined ``data:`` payload of one event, or ``None`` when it has none."""
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


class BodyUsage:
    """Collects a non-streaming body (bounded) so usage can be parsed once it has ended."""

    __slots__ = ("_chunks", "_size", "_tail", "truncated")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._tail = b""
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if not self.truncated and self._size <= MAX_BODY_BYTES:
            self._chunks.append(chunk)
            return
        if not self.truncated:
            self.truncated = True
            self._tail = b"".join(self._chunks)[-TAIL_BYTES:]
            self._chunks = []
        self._tail = (self._tail + chunk)[-TAIL_BYTES:]

    @property
    def size(self) -> int:
        return self._size

    def json(self) -> Any:
        """The parsed body, ``None`` if it is not JSON; for truncated bodies, a dict holding
        only the ``usage`` object found in the tail."""
        if not self.truncated:
            try:
                return parse_json(b"".join(self._chunks))
            except ValueError:
                return None
        m = re.search(rb'"usage"\s*:\s*(\{[^{}]*\})', self._tail)
        if m:
            try:
                return {"usage": parse_json(m.group(1))}
            except ValueError:
                return None
        return None
