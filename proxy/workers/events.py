"""The request events a worker process sends the accounting process, and their wire form.

One line per batch: a JSON array of events, each an array whose first member names its kind.
Times are ``time.monotonic()`` seconds, one clock for every process of the machine (Linux's
``CLOCK_MONOTONIC``), so the accounting process places each event where it happened, whatever
the batching delayed it by.

    ["h", pid, index]                                         a worker is serving
    ["b", request_id, user, team, upstream, model, task, started_at, end_user, key_id,
     extra, devices, prompt_est, stream, max_tokens, images, t]        a request starts
    ["f", request_id, status, t]                              its first byte from upstream
    ["t", request_id, tokens, t]                              tokens streamed (summed per batch)
    ["e", request_id, status, usage, outcome, extra, t]       it ended
    ["c", counter, labels]                                    a decision counted (routing...)
    ["w", request_id, wants]                                  it wants figures sent back
    ["q", ask_id, user, team, request_id, shape]              a budget check (``shape``: None
                                                              or the fields of its estimate)
    ["r", request_id]                                         its admission is abandoned

and back, from the accounting process to the worker that handled the request:

    ["p", request_id, energy_j, co2e_g, source]   its figures so far, at every meter interval
                                                  (energy in the answer: ``WANT_FIGURES``)
    ["F", record]                                 its final record (its span ends with it:
                                                  ``WANT_FINAL``, tracing)
    ["a", ask_id, refusal]                        a budget check's answer: None (admitted,
                                                  held) or the refusal's message and fields
"""

from __future__ import annotations

import json
from typing import Any

from estimators.estimator import RequestShape
from proxy.records import RequestRecord
from proxy.usage.base import Usage, parse_json

try:  # optional, as elsewhere: several times faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only without the extra
    _orjson = None  # type: ignore[assignment]

HELLO = "h"
BEGIN = "b"
FIRST_BYTE = "f"
TOKENS = "t"
END = "e"
COUNT = "c"
WANT = "w"
BUDGET = "q"
ABANDON = "r"
FIGURES = "p"
FINAL = "F"
ANSWER = "a"

#: What a request wants sent back (bits of ``["w", ...]``).
WANT_FIGURES = 1
WANT_FINAL = 2

#: The counters a worker may increment in the accounting process (``Counters``' methods).
COUNTERS = frozenset(("route_decision", "budget_rejection", "overload_refusal"))

Event = list[Any]


def encode(events: list[Event]) -> bytes:
    """One batch, one line (JSON never holds a raw line end)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(events) + b"\n"
        except TypeError:
            pass
    return json.dumps(events, separators=(",", ":"), default=str).encode() + b"\n"


def decode(line: bytes) -> list[Event]:
    events = parse_json(line)
    if not isinstance(events, list):
        raise ValueError("an event batch is a JSON array")
    return events


def begin_event(
    record: RequestRecord,
    devices: list[str] | None,
    prompt_est: int | None,
    stream: bool,
    max_tokens: int | None,
    images: int | None,
    t_s: float,
) -> Event:
    """What is known of a request as it starts: its record's first fields, flat."""
    r = record
    return [
        BEGIN,
        r.request_id,
        r.user,
        r.team,
        r.upstream,
        r.model,
        r.task,
        r.started_at,
        r.end_user,
        r.key_id,
        r.extra,
        devices,
        prompt_est,
        stream,
        max_tokens,
        images,
        t_s,
    ]


def record_of_begin(event: Event) -> RequestRecord:
    """The record a begin event opens (status 0 until the answer's head)."""
    _, rid, user, team, upstream, model, task, started_at, end_user, key_id, extra = event[:11]
    return RequestRecord(
        rid,
        user,
        team,
        upstream,
        model,
        task,
        0,
        started_at,
        end_user=end_user,
        key_id=key_id,
        extra=extra,
    )


def shape_doc(shape: RequestShape) -> list[Any]:
    """What a budget check estimates a request from."""
    s = shape
    return [s.upstream, s.model, s.task, s.prompt_tokens, s.completion_tokens, s.images]


def shape_of(doc: list[Any]) -> RequestShape:
    upstream, model, task, prompt_tokens, completion_tokens, images = doc
    return RequestShape(
        upstream,
        model,
        task,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        images=images,
    )


def usage_doc(usage: Usage) -> dict[str, Any]:
    """What the accounting needs of a request's usage (its text was counted in the worker)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "tokens_source": usage.tokens_source,
        "images": usage.images,
        "audio_s": usage.audio_s,
        "model": usage.model,
    }


def usage_of(doc: dict[str, Any]) -> Usage:
    return Usage(
        prompt_tokens=doc.get("prompt_tokens"),
        completion_tokens=doc.get("completion_tokens"),
        tokens_source=doc.get("tokens_source") or "none",
        images=doc.get("images"),
        audio_s=doc.get("audio_s"),
        model=doc.get("model"),
    )
