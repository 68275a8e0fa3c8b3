"""OpenAI SSE usage capture, as pure functions: every split point, every server variant."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.usage.base import MAX_EVENT_BYTES, SSEFramer, sse_data
from proxy.usage.openai import OpenAISSE, plan_openai_request, usage_from_body
from tests.helpers.openai_replays import (
    DONE,
    LLAMACPP,
    ROLE,
    TRANSFORMERS,
    USAGE,
    VLLM_CLIENT_VIEW,
    VLLM_WITH_USAGE,
    chunk,
)


def run(parser: OpenAISSE, stream: bytes, cuts: list[int]) -> bytes:
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out.append(parser.feed(stream[prev:cut]))
        prev = cut
    out.append(parser.flush())
    return b"".join(out)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_strip_mode_removes_only_the_injected_usage_chunk(step: int) -> None:
    parser = OpenAISSE(strip_usage=True)
    cuts = list(range(step, len(VLLM_WITH_USAGE), step))
    assert run(parser, VLLM_WITH_USAGE, cuts) == VLLM_CLIENT_VIEW
    usage = parser.finish()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.tokens_source) == (7, 3, "server")
    assert parser.tokens == 3
    assert parser.done


def test_strip_mode_removes_usage_null_that_openai_adds_to_every_chunk() -> None:
    with_nulls = ROLE.replace(b"]}\n\n", b'],"usage":null}\n\n') + USAGE + DONE
    parser = OpenAISSE(strip_usage=True)
    assert run(parser, with_nulls, []) == ROLE + DONE


def test_pass_mode_is_byte_identical_and_reads_usage() -> None:
    parser = OpenAISSE(strip_usage=False)
    assert run(parser, VLLM_WITH_USAGE, [5, 50, 51]) == VLLM_WITH_USAGE
    assert parser.finish().completion_tokens == 3


def test_usage_on_the_finish_chunk_llamacpp() -> None:
    parser = OpenAISSE(strip_usage=True)
    assert run(parser, LLAMACPP, [10]) == LLAMACPP  # nothing stripped: it carries choices
    usage = parser.finish()
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 3)
    assert not parser.done  # no [DONE], and that is fine


def test_no_usage_ever_transformers_counts_chunks() -> None:
    parser = OpenAISSE(strip_usage=True, collect_text=True)
    assert run(parser, TRANSFORMERS, [3]) == TRANSFORMERS
    usage = parser.finish()
    assert usage.completion_tokens == 3
    assert usage.tokens_source == "estimate"
    assert parser.text == "a b c"


def test_crlf_framing() -> None:
    crlf = VLLM_WITH_USAGE.replace(b"\n\n", b"\r\n\r\n")
    parser = OpenAISSE(strip_usage=True)
    assert run(parser, crlf, [1, 2, 3]) == VLLM_CLIENT_VIEW.replace(b"\n\n", b"\r\n\r\n")
    assert parser.finish().prompt_tokens == 7


def test_completions_stream_text_field() -> None:
    ev = b'data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":" hi"}]}\n\n'
    parser = OpenAISSE()
    parser.feed(ev * 4)
    assert parser.tokens == 4


def test_plan_injects_include_usage_and_keeps_other_options() -> None:
    doc = {
        "model": "m",
        "stream": True,
        "stream_options": {"continuous_usage_stats": False},
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": 5,
    }
    plan = plan_openai_request("/v1/chat/completions", doc)
    assert plan.inject_usage
    assert plan.body is not None
    sent = json.loads(plan.body)
    assert sent["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in doc.items() if k != "stream_options"
    }
    assert (plan.model, plan.stream, plan.max_tokens) == ("m", True, 5)
    assert plan.prompt_text == "hello world"


@pytest.mark.parametrize(
    "doc",
    [
        {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
        # vLLM: usage in every chunk once include_usage is added (tests/test_stream_options.py)
        {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": True}},
        # what the server makes of these is its business: forwarded as sent
        {"model": "m", "stream": True, "stream_options": {"include_usage": 1}},
        {"model": "m", "stream": True, "stream_options": "yes"},
        {"model": "m", "stream": False},
        {"model": "m"},
    ],
)
def test_plan_leaves_body_alone_when_not_needed(doc: dict[str, object]) -> None:
    plan = plan_openai_request("/v1/chat/completions", doc)
    assert plan.body is None
    assert not plan.inject_usage


def test_usage_from_bodies() -> None:
    chat = {"usage": {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}}
    emb = {"usage": {"prompt_tokens": 6, "total_tokens": 6}}
    img = {"created": 1, "data": [{"b64_json": "x"}, {"b64_json": "y"}]}
    u = usage_from_body("/v1/chat/completions", chat)
    assert (u.prompt_tokens, u.completion_tokens, u.tokens_source) == (4, 9, "server")
    u = usage_from_body("/v1/embeddings", emb)
    assert (u.prompt_tokens, u.completion_tokens) == (6, 0)
    assert usage_from_body("/v1/images/generations", img).images == 2
    assert usage_from_body("/v1/chat/completions", ["not", "a", "dict"]).tokens_source == "none"


def test_sse_data_joins_multiline_data() -> None:
    assert sse_data(b"event: x\ndata: a\ndata:b\n\n") == b"a\nb"
    assert sse_data(b": comment\n\n") is None


def test_framer_is_bounded() -> None:
    framer = SSEFramer(max_frame_bytes=100)
    out = list(framer.push(b"data: " + b"x" * 500))
    assert framer.oversize
    assert b"".join(out) == b"data: " + b"x" * 500
    assert framer.pending() == b""


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.binary(max_size=300), max_size=30), strip=st.booleans())
def test_parser_never_raises_and_never_holds_more_than_one_event(
    pieces: list[bytes], strip: bool
) -> None:
    parser = OpenAISSE(strip_usage=strip, collect_text=True)
    total_in = 0
    total_out = 0
    for piece in pieces:
        total_in += len(piece)
        total_out += len(parser.feed(piece))
        assert len(parser._framer._buf) <= MAX_EVENT_BYTES
    total_out += len(parser.flush())
    parser.finish()
    if not strip:
        assert total_out == total_in
    else:
        assert total_out <= total_in


# -- which chunks are generated tokens ----------------------------------------------------------

PY = '{{"id": "c", "object": "chat.completion.chunk", "choices": [{{"index": 0, {}}}]}}'


@pytest.mark.parametrize(
    ("choice", "tokens"),
    [
        # a role announcement is no token: vLLM's (empty content), llama.cpp's (null), Python's
        ('"delta":{"role":"assistant","content":""},"finish_reason":null', 0),
        ('"delta":{"role":"assistant","content":null},"finish_reason":null', 0),
        ('"delta": {"role": "assistant"}, "finish_reason": null', 0),
        # text, or a token whose bytes are held back (llama-cpp-python, vLLM): one token each
        ('"delta":{"content":"a"},"finish_reason":null', 1),
        ('"delta": {"content": ""}, "logprobs": null, "finish_reason": null', 1),
        # TGI repeats the role in every chunk: the text still counts
        ('"delta":{"role":"assistant","content":" b"},"finish_reason":null', 1),
        # vLLM's end-of-sequence token: no text, counted by vLLM
        ('"delta":{"content":""},"finish_reason":"stop"', 1),
        # finish markers that are no token: an empty delta, a completion's empty text
        ('"delta": {}, "logprobs": null, "finish_reason": "stop"', 0),
        ('"text": "", "logprobs": null, "finish_reason": "length"', 0),
        ('"text":"","finish_reason":null', 1),
        ('"text":" hi","finish_reason":"length"', 1),
    ],
)
def test_each_generated_chunk_is_one_token(choice: str, tokens: int) -> None:
    parser = OpenAISSE()
    event = f"data: {PY.format(choice)}\n\n".encode()
    assert parser.feed(event) == event
    assert parser.tokens == tokens


def test_llamacpp_timings_are_the_count_without_usage() -> None:
    """``timings_per_token``: cumulative timings on every chunk; a stream cut short (no final
    chunk) still has the server's count so far. ``usage``, where sent, wins."""
    timed = [
        chunk(text, extra=f',"timings":{{"cache_n":2,"prompt_n":5,"predicted_n":{n}}}')
        for n, text in enumerate(["a", " b", " c"], start=1)
    ]
    parser = OpenAISSE()
    run(parser, b"".join(timed[:2]), [7])
    usage = parser.finish()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.tokens_source) == (7, 2, "server")
    parser = OpenAISSE()
    run(parser, b"".join(timed) + USAGE + DONE, [])
    assert (parser.finish().prompt_tokens, parser.finish().completion_tokens) == (7, 3)
