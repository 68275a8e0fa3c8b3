"""vLLM 0.10's chat stream bytes for each combination of ``stream_options.include_usage`` and
``continuous_usage_stats`` (see tests/test_stream_options.py for how vLLM decides), for a
7-token prompt and the answer "a b c" ended by an end-of-sequence token."""

from __future__ import annotations

HEAD = (
    b'data: {"id":"chatcmpl-9f1c","object":"chat.completion.chunk","created":1733300000,'
    b'"model":"m",'
)
PROMPT_TOKENS = 7
PIECES = ('"role":"assistant","content":""', '"content":"a"', '"content":" b"', '"content":" c"')


def _usage(completion: int) -> bytes:
    total = PROMPT_TOKENS + completion
    return (
        f'"usage":{{"prompt_tokens":{PROMPT_TOKENS},"total_tokens":{total},'
        f'"completion_tokens":{completion}}}'
    ).encode()


def vllm_stream(include_usage: bool, continuous: bool) -> bytes:
    """The bytes vLLM 0.10 streams for the chat below, as ``should_include_usage`` decides."""
    each = include_usage and continuous
    out = [
        HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        b'"logprobs":null,"finish_reason":null}]'
        + (b"," + _usage(0) if each else b"")
        + b',"prompt_token_ids":null}\n\n'
    ]
    for n, piece in enumerate(PIECES[1:], start=1):
        out.append(
            HEAD + b'"choices":[{"index":0,"delta":{' + piece.encode() + b'},"logprobs":null,'
            b'"finish_reason":null,"token_ids":null}]'
            + (b"," + _usage(n) if each else b"")
            + b"}\n\n"
        )
    out.append(  # the end-of-sequence token: no text, but a generated (and counted) token
        HEAD + b'"choices":[{"index":0,"delta":{"content":""},"logprobs":null,'
        b'"finish_reason":"stop","stop_reason":null,"token_ids":null}]'
        + (b"," + _usage(4) if each else b"")
        + b"}\n\n"
    )
    if include_usage:
        out.append(HEAD + b'"choices":[],' + _usage(4) + b"}\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)
