"""OpenTelemetry (``tracing``): a real ``wattproxy serve`` exports one span per request to a real
OTLP/HTTP receiver, with the GenAI attributes and the final energy; the upstream gets the
span's ``traceparent`` (continuing the client's trace); an OpenMetrics scrape carries the trace
id as the energy histogram's exemplar. Disabled, nothing of OpenTelemetry is imported or sent."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from proxy.config import TracingConfig
from proxy.metrics import Metrics, metrics_handler
from proxy.records import RequestRecord
from proxy.standins import StandIn
from proxy.tracing import (
    NullTracing,
    OTelTracing,
    build_tracing,
    end_attributes,
    exemplar,
    operation_name,
)
from tests.helpers.otlp_receiver import OTLPReceiver
from tests.helpers.serve import base_config, final_record, serve_process

#: An env var that is never set: the emissions API is open, as with no admin token.
ADMIN_ENV = "WP_TEST_TRACING_ADMIN_TOKEN"
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "one two three four"}]}
EMBED = {"model": "embedder", "input": "one two three"}
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
#: -X importtime: the process logs every import as it happens, lazy ones included
IMPORT_LOG = {"PYTHONPROFILEIMPORTTIME": "1"}
OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8"
#: ``bucket{labels} count # {trace_id="..."} value [timestamp]``
EXEMPLAR = re.compile(
    r"^wattproxy_request_energy_joules_bucket\{(?P<labels>[^}]*)\} \S+ "
    r'# \{trace_id="(?P<trace_id>[0-9a-f]{32})"\} (?P<value>\S+)'
)


def traceparent_of(headers: dict[str, str]) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == "traceparent"), None)


async def peers(
    aiohttp_server: Any, tmp_path: Path, enabled: bool
) -> tuple[StandIn, OTLPReceiver, dict[str, Any]]:
    """A stand-in upstream, an OTLP receiver, and a proxy config sending spans to it (or
    naming it, disabled)."""
    standin = StandIn(scale=0)
    upstream: TestServer = await aiohttp_server(standin.app())
    receiver = OTLPReceiver()
    otlp: TestServer = await aiohttp_server(receiver.app())
    doc = base_config(str(upstream.make_url("")).rstrip("/"), tmp_path)
    doc["admin_token_env"] = ADMIN_ENV
    doc["identity"] = {"allow_header_identity": True}  # X-Wattproxy-User names the user
    doc["tracing"] = {
        "enabled": enabled,
        "endpoint": str(otlp.make_url("/v1/traces")),
        "service_name": "wattproxy-test",
        "export_interval_ms": 20,
    }
    return standin, receiver, doc


async def post(
    s: aiohttp.ClientSession, base: str, path: str, doc: dict[str, Any], **headers: str
) -> str:
    """Send one request; the proxy's request id of it."""
    async with s.post(base + path, json=doc, headers={"X-Wattproxy-User": "carol", **headers}) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-Request-Id"]


@pytest.mark.parametrize("workers", [1, 2])
async def test_one_span_per_request_with_genai_and_energy_attributes_and_trace_context(
    aiohttp_server: Any, tmp_path: Path, workers: int
) -> None:
    """Also with two workers: the span opens in the worker that handles the request and ends
    there with the final record the accounting process sends back."""
    standin, receiver, doc = await peers(aiohttp_server, tmp_path, enabled=True)
    doc["listen"]["workers"] = workers
    async with serve_process(doc, tmp_path, env=IMPORT_LOG) as served, aiohttp.ClientSession() as s:
        base = served.base
        rids = [
            await post(s, base, "/v1/chat/completions", CHAT),
            await post(s, base, "/v1/chat/completions", CHAT, traceparent=CLIENT_PARENT),
            await post(s, base, "/v1/embeddings", EMBED),
        ]
        records = [await final_record(s, base, rid) for rid in rids]
        spans = await receiver.wait_for(3)
        async with s.get(base + "/metrics", headers={"Accept": OPENMETRICS_ACCEPT}) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            openmetrics = await r.text()
        async with s.get(base + "/metrics") as r:
            assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
            plain = await r.text()
    assert "opentelemetry.sdk" in served.output()  # what the disabled test looks for
    assert len(spans) == 3  # one per request, nothing else
    by_rid = {sp.attributes["wattproxy.request_id"]: sp for sp in spans}
    assert sorted(by_rid) == sorted(rids)
    for rid, rec in zip(rids, records, strict=True):
        span = by_rid[rid]
        a = span.attributes
        assert span.resource["service.name"] == "wattproxy-test"
        assert span.kind == 2  # SPAN_KIND_SERVER
        assert rec["trace_id"] == span.trace_id  # the record names its trace
        assert a["gen_ai.request.model"] == rec["model"]
        assert a["gen_ai.usage.input_tokens"] == rec["prompt_tokens"]
        assert a["wattproxy.energy_j"] == pytest.approx(rec["energy_j"], abs=1e-6)
        assert a["wattproxy.energy_j"] > 0
        assert a["wattproxy.co2e_g"] == pytest.approx(rec["co2e_g"], abs=1e-9)
        assert a["wattproxy.source"] == rec["source"]
        assert a["wattproxy.final"] is True
        assert a["wattproxy.user"] == "carol"
        assert a["wattproxy.task"] == rec["task"]
        assert a["wattproxy.outcome"] == "ok"
        assert a["http.response.status_code"] == 200
        assert span.end_ns - span.start_ns == pytest.approx(rec["duration_s"] * 1e9, abs=1e3)
        # no device figures configured here: no embodied or water attribute, not a zero
        assert not any(k.startswith(("wattproxy.embodied", "wattproxy.water")) for k in a)
    chat, continued, embed = (by_rid[rid] for rid in rids)
    assert chat.name == "chat llama" and chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.usage.output_tokens"] == records[0]["completion_tokens"]
    assert chat.parent_span_id == ""  # a new trace
    assert continued.trace_id == CLIENT_TRACE_ID  # the client's trace goes on
    assert continued.parent_span_id == CLIENT_SPAN_ID
    assert embed.attributes["gen_ai.operation.name"] == "embeddings"
    assert embed.attributes["wattproxy.task"] == "feature-extraction"
    # the upstream got each request's own span as its parent
    sent = [traceparent_of(req["headers"]) or "" for req in standin.requests]
    assert [tp.split("-")[:3] for tp in sent] == [
        ["00", sp.trace_id, sp.span_id] for sp in (chat, continued, embed)
    ]
    assert all(int(tp.split("-")[3], 16) & 1 for tp in sent)  # sampled
    # exemplars: each names a span's trace and carries that span's energy
    energy_of = {sp.trace_id: sp.attributes["wattproxy.energy_j"] for sp in spans}
    found = [m for m in map(EXEMPLAR.match, openmetrics.splitlines()) if m]
    assert found, openmetrics
    for m in found:
        assert float(m["value"]) == pytest.approx(energy_of[m["trace_id"]])
    assert {m["trace_id"] for m in found} >= {embed.trace_id}  # alone in its task's series
    assert "# {" not in plain and "trace_id" not in plain  # the plain format has none


async def test_disabled_tracing_imports_and_sends_nothing(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    standin, receiver, doc = await peers(aiohttp_server, tmp_path, enabled=False)
    async with serve_process(doc, tmp_path, env=IMPORT_LOG) as served, aiohttp.ClientSession() as s:
        rid = await post(s, served.base, "/v1/chat/completions", CHAT, traceparent=CLIENT_PARENT)
        rec = await final_record(s, served.base, rid)
        async with s.get(served.base + "/metrics", headers={"Accept": OPENMETRICS_ACCEPT}) as r:
            openmetrics = await r.text()
        assert served.stop() == 0  # a clean exit: whatever would be flushed, is
        output = served.output()
    assert "import time:" in output  # the import log is there to be read
    assert "opentelemetry" not in output
    assert receiver.posts == 0 and receiver.spans == []
    assert "trace_id" not in rec
    assert traceparent_of(standin.requests[0]["headers"]) == CLIENT_PARENT  # passed through
    assert not [ln for ln in openmetrics.splitlines() if EXEMPLAR.match(ln)]


def test_enabled_without_the_sdk_warns_and_serves_untraced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # not installed
    with caplog.at_level(logging.WARNING, "wattproxy.tracing"):
        tracing = build_tracing(TracingConfig(enabled=True))
    assert type(tracing) is NullTracing
    assert "pip install 'wattproxy[otel]'" in caplog.text
    assert type(build_tracing(TracingConfig())) is NullTracing


@pytest.mark.parametrize(
    ("task", "path", "operation"),
    [
        ("text-generation", "/v1/chat/completions", "chat"),
        ("text-generation", "/api/chat", "chat"),
        ("text-generation", "/v1/completions", "text_completion"),
        ("text-generation", "/generate", "text_completion"),
        ("feature-extraction", "/v1/embeddings", "embeddings"),
        ("feature-extraction", "/embed", "embeddings"),
        ("sentence-similarity", "/similarity", "embeddings"),
        ("text-to-image", "/v1/images/generations", "generate_content"),
        ("automatic-speech-recognition", "/v1/audio/transcriptions", "generate_content"),
        ("other", "/v1/models", "other"),
    ],
)
def test_operation_names(task: str, path: str, operation: str) -> None:
    assert operation_name(task, path) == operation


def test_span_attributes_name_failures_and_leave_out_what_is_unknown() -> None:
    rec = RequestRecord("r1", "carol", None, "llm", None, "text-generation", 504, "t")
    rec.outcome = "upstream_timeout"
    a = end_attributes(rec, "chat")
    assert a["error.type"] == "upstream_timeout"
    assert "gen_ai.request.model" not in a and "gen_ai.usage.input_tokens" not in a
    assert "wattproxy.team" not in a
    assert exemplar(rec) is None
    rec.extra["trace_id"] = "ab" * 16
    assert exemplar(rec) == {"trace_id": "ab" * 16}


def test_a_client_that_does_not_sample_gets_no_trace_id_on_its_record() -> None:
    """The client's sampled flag is followed: an unsampled trace is propagated, not exported,
    and names no exemplar; a request without one is sampled and exported."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = OTelTracing(TracingConfig(enabled=True), exporter=exporter)
    rec = RequestRecord("r1", "carol", None, "llm", "m", "text-generation", 0, "t")
    tracing.start(rec, {"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-00"}, "/v1/x")
    upstream: dict[str, str] = {}
    tracing.inject("r1", upstream)
    assert upstream["traceparent"].startswith(f"00-{CLIENT_TRACE_ID}-")
    assert int(upstream["traceparent"].split("-")[3], 16) & 1 == 0  # not sampled
    assert "trace_id" not in rec.extra
    kept = RequestRecord("r2", "carol", None, "llm", "m", "text-generation", 0, "t")
    tracing.start(kept, {}, "/v1/completions")
    assert len(kept.extra["trace_id"]) == 32
    for r in (rec, kept):
        r.final, r.status, r.duration_s = True, 200, 0.5
        tracing.finish(r)
    tracing.close()  # flushes the batch
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["wattproxy.request_id"] == "r2"
    assert span.name == "text_completion m"


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "text/plain",
        "text/plain;version=0.0.4;q=0.9,*/*;q=0.1",
        "application/openmetrics-text;version=0.0.1",  # a version prometheus_client lacks
    ],
)
async def test_plain_scrapes_get_the_text_format_byte_for_byte(
    aiohttp_client: Any, accept: str | None
) -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.request_energy.labels("text-generation").observe(2.0, {"trace_id": "ab" * 16})
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return await metrics_handler(request, metrics)

    app.router.add_get("/metrics", handler)
    client = await aiohttp_client(app)
    async with client.get("/metrics", headers={"Accept": accept} if accept else {}) as r:
        assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert await r.read() == metrics.exposition()
    prometheus_accept = (
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
    )
    async with client.get("/metrics", headers={"Accept": prometheus_accept}) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        body = await r.read()
    assert body == openmetrics_latest(metrics.registry)
    assert b'# {trace_id="' + b"ab" * 16 + b'"} 2.0' in body


def test_embodied_and_water_attributes_come_with_the_records_figures() -> None:
    base = dict(
        request_id="r",
        user="u",
        team=None,
        upstream="llm",
        model="m",
        task="text-generation",
        status=200,
        started_at="2026-01-01T00:00:00Z",
    )
    without = end_attributes(RequestRecord(**base), "chat")  # type: ignore[arg-type]
    assert "wattproxy.embodied_co2e_g" not in without and "wattproxy.water_l" not in without
    rec = RequestRecord(**base, embodied_co2e_g=0.25, water_l=0.003)  # type: ignore[arg-type]
    attrs = end_attributes(rec, "chat")
    assert attrs["wattproxy.embodied_co2e_g"] == 0.25
    assert attrs["wattproxy.water_l"] == 0.003
