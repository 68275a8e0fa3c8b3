"""The per-request shortcuts give what the plain versions gave: record documents, their JSON,
request ids and the cached metric children."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.headers import new_request_id
from proxy.metrics import OTHER, Metrics
from proxy.records import SPEC_FIELDS, RequestRecord, dumps_doc, utc_iso, utc_now_iso, utcnow
from proxy.usage.base import Framer, SSEFramer


def asdict_to_dict(r: RequestRecord) -> dict[str, Any]:
    """``RequestRecord.to_dict`` as it was written with ``dataclasses.asdict``."""
    d = dataclasses.asdict(r)
    extra = d.pop("extra")
    d["energy_j"] = round(r.energy_j, 6)
    d["co2e_g"] = round(r.co2e_g, 9)
    ordered = {k: d.pop(k) for k in SPEC_FIELDS}
    ordered.update(d)
    ordered.update(extra)
    return ordered


def record(**extra: Any) -> RequestRecord:
    return RequestRecord(
        request_id="r1",
        user="alice",
        team=None,
        upstream="vllm",
        model="llama",
        task="chat",
        status=200,
        started_at="2026-01-01T00:00:00.000Z",
        ended_at="2026-01-01T00:00:01.000Z",
        prompt_tokens=12,
        energy_j=1.234567891,
        co2e_g=0.0001234567891,
        ttfb_s=0.01,
        extra=extra,
    )


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"estimate_method": "prior", "audio_s": 1.5, "images": 2},
        {"size": [1024, 1024], "nested": {"a": [1, {"b": None}]}},
        {"energy_j": 9.0, "user": "shadowed"},  # extra keys override fields in place
    ],
)
def test_to_dict_matches_asdict(extra: dict[str, Any]) -> None:
    r = record(**extra)
    got, want = r.to_dict(), asdict_to_dict(r)
    assert got == want
    assert list(got) == list(want)


def test_to_dict_copies_nested_extra() -> None:
    r = record(nested={"a": [1]})
    d = r.to_dict()
    d["nested"]["a"].append(2)
    assert r.extra["nested"] == {"a": [1]}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"text": "héllo ✓", "n": 2**70},  # non-ASCII; an int orjson refuses
        {"size": (512, 512), "flag": True},
    ],
)
def test_dumps_doc_reads_back_as_json_dumps(extra: dict[str, Any]) -> None:
    doc = record(**extra).to_dict()
    assert json.loads(dumps_doc(doc)) == json.loads(json.dumps(doc))


def test_dumps_doc_keeps_non_finite_floats() -> None:
    doc = record(audio_s=math.inf).to_dict()
    doc["energy_j"] = math.nan
    back = json.loads(dumps_doc(doc))
    assert math.isnan(back["energy_j"]) and back["audio_s"] == math.inf


def test_dumps_doc_refuses_what_json_refuses() -> None:
    doc = record(when=dataclasses.make_dataclass("X", [])()).to_dict()
    with pytest.raises(TypeError):
        dumps_doc(doc)


def test_request_ids_unique_and_unaffected_by_random_seed() -> None:
    import random

    random.seed(0)
    first = new_request_id()
    random.seed(0)
    ids = {new_request_id() for _ in range(10_000)} | {first}
    assert len(ids) == 10_001
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_children_draw_other_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32 and child != new_request_id()


def test_cached_children_count_like_labels() -> None:
    m = Metrics(CollectorRegistry(), max_model_labels=1)
    for code in ("200", "200", "500"):
        s = m.series("vllm", m.model_label("llama"), "chat")
        s.requests(code).inc()
        s.prompt_tokens.inc(3)
    assert m.series("vllm", "llama", "chat") is s
    m.series("vllm", m.model_label("other"), "chat").requests("200").inc()
    get = m.registry.get_sample_value
    base = {"upstream": "vllm", "model": "llama", "task": "chat"}
    assert get("wattproxy_requests_total", {**base, "code": "200"}) == 2
    assert get("wattproxy_requests_total", {**base, "code": "500"}) == 1
    assert get("wattproxy_requests_total", {**base, "model": OTHER, "code": "200"}) == 1
    assert get("wattproxy_tokens_total", {**base, "type": "prompt"}) == 9
    energy, co2e = m.energy_for("vllm", "llama", "chat", "measured", "alice")
    assert m.energy_for("vllm", "llama", "chat", "measured", "alice") == (energy, co2e)
    energy.inc(2.0)
    assert get("wattproxy_energy_joules_total", {**base, "source": "measured"}) == 2.0
    m.inflight_for("vllm").inc()
    assert get("wattproxy_inflight_requests", {"upstream": "vllm"}) == 1


class RegexSSEFramer(Framer):
    """The SSE framer without its shortcut."""

    __slots__ = ()
    terminator = SSEFramer.terminator


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\n\n", b"ab"]), max_size=12)),
    st.integers(4, 64),
)
def test_sse_framer_shortcut_frames_as_the_regex(chunks: list[list[bytes]], limit: int) -> None:
    fast, slow = SSEFramer(max_frame_bytes=limit), RegexSSEFramer(max_frame_bytes=limit)
    for parts in chunks:
        chunk = b"".join(parts)
        assert list(fast.push(chunk)) == list(slow.push(chunk))
        assert fast.oversize == slow.oversize
    assert fast.pending() == slow.pending()


def test_utc_now_iso_reads_as_utc_iso_of_utcnow() -> None:
    before = utc_iso(utcnow())
    now = utc_now_iso()
    after = utc_iso(utcnow())
    assert len(now) == len(before) == 24 and now.endswith("Z")
    assert before <= now <= after


def test_accountant_end_copies_every_shape_field() -> None:
    """``Accountant.end`` rebuilds the request shape field by field: a new field needs a line."""
    from estimators.estimator import RequestShape

    assert [f.name for f in dataclasses.fields(RequestShape)] == [
        "upstream",
        "model",
        "task",
        "prompt_tokens",
        "completion_tokens",
        "duration_s",
        "images",
        "concurrency",
    ]
