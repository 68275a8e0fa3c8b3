"""A real OTLP/HTTP traces receiver for tests: ``POST /v1/traces`` with an
``ExportTraceServiceRequest`` in protobuf (gzip or not), decoded with opentelemetry-proto and
kept as plain ``ReceivedSpan``s; it answers as a collector does."""

from __future__ import annotations

import asyncio
import gzip
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int


def any_value(value: Any) -> Any:
    """The Python value of an OTLP ``AnyValue``."""
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def key_values(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class OTLPReceiver:
    """Collects every span exported to it; ``posts`` counts the export requests."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    posts: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        return app

    async def traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        assert request.content_type == "application/x-protobuf", request.content_type
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.posts += 1
        for rs in export.resource_spans:
            resource = key_values(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=key_values(s.attributes),
                            resource=resource,
                            status_code=s.status.code,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_for(self, count: int, timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """The spans once at least ``count`` have arrived (a bound, not a timed assertion)."""
        deadline = time.monotonic() + timeout_s
        while len(self.spans) < count:
            assert time.monotonic() < deadline, f"{len(self.spans)} of {count} spans arrived"
            await asyncio.sleep(0.02)
        return self.spans
