"""Usage capture: one module per API wire format, pure (bytes in, bytes out), chosen here.

An API module provides up to three functions, registered in ``APIS``:
``plan(path, doc) -> RequestPlan`` (read a JSON request body, maybe rewrite it),
``stream(path, content_type, plan, collect_text) -> StreamUsage | None`` (an incremental parser
for a streamed response, or None if the content type is not one it streams), and
``body(path, doc) -> Usage`` (usage of a whole JSON response).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.usage import openai
from proxy.usage.base import BodyUsage, RequestPlan, SSEFramer, StreamUsage, Usage, parse_json

__all__ = [
    "APIS",
    "ApiUsage",
    "BodyUsage",
    "RequestPlan",
    "SSEFramer",
    "StreamUsage",
    "Usage",
    "parse_json",
]


@dataclass(frozen=True, slots=True)
class ApiUsage:
    plan: Callable[[str, Any], RequestPlan]
    stream: Callable[[str, str, RequestPlan, bool], StreamUsage | None]
    body: Callable[[str, Any], Usage]


def _generic_plan(path: str, doc: Any) -> RequestPlan:
    plan = RequestPlan()
    if isinstance(doc, dict) and isinstance(doc.get("model"), str):
        plan.model = doc["model"]
    return plan


def _no_stream(path: str, content_type: str, plan: RequestPlan, collect: bool) -> None:
    return None


def _no_body(path: str, doc: Any) -> Usage:
    return Usage()


OPENAI = ApiUsage(openai.plan_openai_request, openai.stream_parser, openai.usage_from_body)
GENERIC = ApiUsage(_generic_plan, _no_stream, _no_body)

#: upstreams[].api -> its usage capture
APIS: dict[str, ApiUsage] = {
    "openai": OPENAI,
    "generic": GENERIC,
    "tgi": OPENAI,
    "tei": OPENAI,
    "ollama": OPENAI,
}


def for_api(api: str) -> ApiUsage:
    return APIS.get(api, GENERIC)
