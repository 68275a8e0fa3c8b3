"""Usage capture: one module per API wire format, pure (bytes in, bytes out), chosen here.

An API module provides up to four functions, registered in ``APIS``:
``plan(path, doc) -> RequestPlan`` (read a JSON request body, maybe rewrite it),
``stream(path, content_type, plan, collect_text) -> StreamUsage | None`` (an incremental parser
for a streamed response, or None if the content type is not one it streams),
``body(path, doc) -> Usage`` (usage of a whole JSON response), and
``headers(path, headers) -> Usage | None`` (counts a server puts in response headers).

``json_endpoint(api, path)`` says whether an API reads ``path``'s request body as JSON, so the
proxy parses it (and routes it by its ``model``) whatever Content-Type the client sent.

``upload_probe(content_type)`` watches a streamed non-JSON upload (a multipart audio file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.usage import ollama, openai, tei, tgi
from proxy.usage.base import (
    BodyUsage,
    RequestPlan,
    SSEFramer,
    StreamUsage,
    UploadProbe,
    Usage,
    parse_json,
)
from proxy.usage.multipart import upload_probe

__all__ = [
    "APIS",
    "ApiUsage",
    "BodyUsage",
    "RequestPlan",
    "SSEFramer",
    "StreamUsage",
    "UploadProbe",
    "Usage",
    "for_api",
    "json_endpoint",
    "parse_json",
    "upload_probe",
]


def _no_headers(path: str, headers: Mapping[str, str]) -> Usage | None:
    return None


@dataclass(frozen=True, slots=True)
class ApiUsage:
    plan: Callable[[str, Any], RequestPlan]
    stream: Callable[[str, str, RequestPlan, bool], StreamUsage | None]
    body: Callable[[str, Any], Usage]
    headers: Callable[[str, Mapping[str, str]], Usage | None] = _no_headers
    #: paths whose request body is JSON whatever the Content-Type says
    json_paths: frozenset[str] = frozenset()


def _generic_plan(path: str, doc: Any) -> RequestPlan:
    plan = RequestPlan()
    if isinstance(doc, dict) and isinstance(doc.get("model"), str):
        plan.model = doc["model"]
    return plan


def _no_stream(path: str, content_type: str, plan: RequestPlan, collect: bool) -> None:
    return None


def _no_body(path: str, doc: Any) -> Usage:
    return Usage()


OPENAI = ApiUsage(
    openai.plan_openai_request,
    openai.stream_parser,
    openai.usage_from_body,
    json_paths=openai.JSON_PATHS,
)
#: a generic server's paths are unknown: its bodies are JSON when their Content-Type says so
GENERIC = ApiUsage(_generic_plan, _no_stream, _no_body)
TGI = ApiUsage(
    tgi.plan_request,
    tgi.stream_parser,
    tgi.usage_from_body,
    tgi.usage_from_headers,
    json_paths=tgi.JSON_PATHS,
)
TEI = ApiUsage(
    tei.plan_request,
    tei.stream_parser,
    tei.usage_from_body,
    tei.usage_from_headers,
    json_paths=tei.JSON_PATHS,
)
OLLAMA = ApiUsage(
    ollama.plan_request,
    ollama.stream_parser,
    ollama.usage_from_body,
    json_paths=ollama.JSON_PATHS,
)

#: upstreams[].api -> its usage capture
APIS: dict[str, ApiUsage] = {
    "openai": OPENAI,
    "generic": GENERIC,
    "tgi": TGI,
    "tei": TEI,
    "ollama": OLLAMA,
}


def for_api(api: str) -> ApiUsage:
    return APIS.get(api, GENERIC)


def json_endpoint(api: str, path: str) -> bool:
    """Whether ``api`` reads ``path``'s request body as JSON: such a body is parsed (and routed
    by its ``model``) whatever Content-Type the client sent (curl's ``-d`` sends
    ``application/x-www-form-urlencoded``)."""
    return (path.rstrip("/") or "/") in for_api(api).json_paths
