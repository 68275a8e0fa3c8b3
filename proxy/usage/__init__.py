"""Usage capture: one incremental parser per API wire format, pure (bytes in, bytes out)."""

from proxy.usage.base import BodyUsage, SSEFramer, StreamUsage, Usage, parse_json
from proxy.usage.openai import OpenAIRequest, OpenAISSE, plan_openai_request

__all__ = [
    "BodyUsage",
    "OpenAIRequest",
    "OpenAISSE",
    "SSEFramer",
    "StreamUsage",
    "Usage",
    "parse_json",
    "plan_openai_request",
]
