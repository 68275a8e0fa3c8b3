"""A request's token counts, from everything the proxy saw of it: the server's usage (in the
stream, the body or headers), its generated text recounted with the model's tokenizer when the
server gave no count, or an estimate from bytes. Pure (a tokenizer is computation, not I/O).

Order of trust: the server's own counts; then the tokenizer's; then an estimate (chunk counts,
bytes / ``BYTES_PER_TOKEN``). A count of zero for a non-empty prompt is a placeholder some
servers send, and is recounted. The record's ``tokens_source`` is the least certain source that
contributed.
"""

from __future__ import annotations

from typing import Any

from proxy.tokens import BYTES_PER_TOKEN, TokenCounter, estimate_tokens
from proxy.usage import for_api
from proxy.usage.base import BodyUsage, RequestPlan, StreamUsage, Usage, weaker_source


def prompt_estimate(plan: RequestPlan, data: Any) -> int:
    """Prompt tokens expected before the upstream answers: from the prompt text the plan
    found, else from the body's size (0 for a body that streams through)."""
    if plan.prompt_text:
        return estimate_tokens(plan.prompt_text)
    return len(data) // BYTES_PER_TOKEN if isinstance(data, bytes) else 0


def resolve_usage(
    api: str,
    path: str,
    plan: RequestPlan,
    counter: TokenCounter | None = None,
    stream: StreamUsage | None = None,
    body: BodyUsage | None = None,
    header_usage: Usage | None = None,
) -> Usage:
    """The usage of one finished (or broken-off) request.

    Args:
        api: the upstream's API (``openai``, ``tgi``...), whose parsers read ``body``.
        path: the request path.
        plan: what the request body said (prompt, messages, images, the upload probe).
        counter: the upstream's tokenizer, if it has one loaded.
        stream: the response's incremental parser, when the response was parsed as it streamed.
        body: the collected JSON response body, when it was collected instead.
        header_usage: counts the upstream sent in response headers.
    """
    usage = Usage()
    if stream is not None:
        usage = stream.finish()
        if usage.tokens_source != "server" and counter is not None and stream.text:
            counted = counter.count(stream.text)
            # each generated chunk held a token at least; bytes a server dropped are not
            # in the text (llama-cpp-python's undecodable tokens)
            if counted >= (usage.completion_tokens or 0):
                usage.completion_tokens = counted
                usage.tokens_source = "tokenizer"
    elif body is not None:
        usage = for_api(api).body(path, body.json())
    if header_usage is not None:
        usage.fill_from(header_usage)
    if usage.completion_tokens is None and usage.generated_text is not None:
        if counter is not None:
            usage.completion_tokens = counter.count(usage.generated_text)
            usage.tokens_source = weaker_source(usage.tokens_source, "tokenizer")
        else:
            usage.completion_tokens = estimate_tokens(usage.generated_text)
            usage.tokens_source = weaker_source(usage.tokens_source, "estimate")
    if usage.prompt_tokens == 0 and plan.prompt_text.strip():
        usage.prompt_tokens = None  # a zero count for a prompt is a placeholder: recount
    if usage.prompt_tokens is None and (plan.prompt_text or plan.messages or plan.prompt_parts):
        if counter is not None and plan.prompt_parts:
            usage.prompt_tokens = sum(counter.count_prompt(None, p) for p in plan.prompt_parts)
            usage.tokens_source = weaker_source(usage.tokens_source, "tokenizer")
        elif counter is not None:
            usage.prompt_tokens = counter.count_prompt(plan.messages, plan.prompt_text)
            usage.tokens_source = weaker_source(usage.tokens_source, "tokenizer")
        else:
            usage.prompt_tokens = estimate_tokens(plan.prompt_text)
            usage.tokens_source = weaker_source(usage.tokens_source, "estimate")
    if plan.upload is not None:
        uploaded = plan.upload.finish()
        usage.audio_s = uploaded.audio_s if uploaded.audio_s is not None else usage.audio_s
        usage.model = uploaded.model
    for key, value in plan.extra.items():  # what the request said (image size, steps)
        usage.extra.setdefault(key, value)
    if usage.images is None:
        usage.images = plan.images
    return usage
