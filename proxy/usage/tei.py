"""Usage capture for Hugging Face text-embeddings-inference (TEI).

Native routes report no usage in their bodies: ``/embed`` and ``/embed_all`` answer arrays of
vectors, ``/embed_sparse`` arrays of ``{"index", "value"}`` lists, ``/rerank`` a list of
``{"index", "score"}``, ``/predict`` a list of ``{"score", "label"}``. TEI puts the count in the
``x-compute-tokens`` header instead; without it the prompt is counted with the model's tokenizer
(each input, each rerank pair, on its own). ``/tokenize`` answers the tokens themselves.
``/v1/embeddings`` is OpenAI-compatible, usage included. Encoders generate nothing: completion
tokens are 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from estimators.units import parse_count
from proxy.usage import openai
from proxy.usage.base import RequestPlan, StreamUsage, Usage

#: Paths whose request body is JSON, whatever Content-Type the client sent.
JSON_PATHS = frozenset(
    (
        "/embed",
        "/embed_all",
        "/embed_sparse",
        "/rerank",
        "/predict",
        "/similarity",
        "/tokenize",
        "/decode",
        "/v1/embeddings",
    )
)


def _texts(value: Any) -> list[str]:
    """``inputs``: a string, a list of strings, or a list of pairs (``/predict``)."""
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, list):
                out.extend(x for x in item if isinstance(x, str))
    return out


def plan_request(path: str, doc: Any) -> RequestPlan:
    if path.startswith("/v1/"):
        return openai.plan_openai_request(path, doc)
    plan = RequestPlan()
    if not isinstance(doc, dict):
        return plan
    if isinstance(doc.get("model"), str):
        plan.model = doc["model"]
    if path == "/rerank":
        query = doc.get("query")
        texts = _texts(doc.get("texts"))
        if isinstance(query, str) and texts:
            plan.prompt_parts = [p for t in texts for p in (query, t)]
            plan.prompt_text = "\n".join([query, *texts])
        return plan
    if path == "/predict" and isinstance(doc.get("inputs"), list):
        inputs = doc["inputs"]
        if len(inputs) == 2 and all(isinstance(x, str) for x in inputs):
            inputs = [inputs]  # one (text, text_pair), not a batch of two
        plan.prompt_parts = [" ".join(_texts([pair])) for pair in inputs]
    else:
        plan.prompt_parts = _texts(doc.get("inputs")) or None
    plan.prompt_text = "\n".join(plan.prompt_parts or ())
    return plan


def stream_parser(
    path: str, content_type: str, plan: RequestPlan, collect_text: bool
) -> StreamUsage | None:
    """TEI does not stream; its OpenAI route neither, but it is parsed as OpenAI anyway."""
    if path.startswith("/v1/"):
        return openai.stream_parser(path, content_type, plan, collect_text)
    return None


def usage_from_body(path: str, doc: Any) -> Usage:
    if path.startswith("/v1/"):
        return openai.usage_from_body(path, doc)
    usage = Usage()
    if path == "/tokenize" and isinstance(doc, list):
        batch = doc if doc and all(isinstance(x, list) for x in doc) else [doc]
        usage.merge_server(sum(len(tokens) for tokens in batch), 0)
        return usage
    usage.completion_tokens = 0  # what the prompt counts came from is decided elsewhere
    return usage


def usage_from_headers(path: str, headers: Mapping[str, str]) -> Usage | None:
    """``x-compute-tokens``: the tokens TEI computed for the whole request."""
    tokens = parse_count(headers.get("x-compute-tokens"))
    if tokens is None:
        return None
    usage = Usage()
    usage.merge_server(tokens, 0)
    return usage
