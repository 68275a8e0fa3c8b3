"""``proxy.usage.resolve``: a request's token counts from what the proxy saw of it, as a table of
cases (the request's plan, the answer's bytes as the upstream sent them, a tokenizer or none)
and the counts that come out, with their source. No sockets: the parsers are fed the bytes."""

from __future__ import annotations

import io
import json
import wave
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.tokens import TokenCounter
from proxy.usage import BodyUsage, for_api
from proxy.usage.base import RequestPlan
from proxy.usage.multipart import upload_probe
from proxy.usage.resolve import prompt_estimate, resolve_usage
from tests.helpers.tiny_model import build_tokenizer, pieces

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "how are you today ?"}]
# the tiny tokenizer's chat template: "<role> : <content> </s> " per message, "assistant :"
CHAT_PROMPT = pieces("user : how are you today ?") + 1 + 2
ANSWER = ["hello", " world", " w1"]


def sse(*objs: Any) -> bytes:
    return (
        b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs) + b"data: [DONE]\n\n"
    )


def deltas(*extra: Any) -> bytes:
    return sse(*({"choices": [{"index": 0, "delta": {"content": t}}]} for t in ANSWER), *extra)


def chat_plan(stream: bool = True) -> RequestPlan:
    doc = {"model": "m", "messages": MESSAGES, "stream": stream}
    return for_api("openai").plan(CHAT, doc)


def wav(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return buf.getvalue()


BOUNDARY = "resolve-test"


def form(audio: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + audio
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@dataclass
class Case:
    name: str
    plan: RequestPlan
    #: the answer: streamed (``ctype`` text/event-stream...) or a JSON body
    answer: bytes = b""
    ctype: str = "application/json"
    api: str = "openai"
    path: str = CHAT
    headers: Mapping[str, str] = field(default_factory=dict)
    tokenizer: bool = False
    upload: bytes | None = None
    expect: dict[str, Any] = field(default_factory=dict)


def _upload_plan() -> RequestPlan:
    plan = RequestPlan()
    plan.upload = upload_probe(f"multipart/form-data; boundary={BOUNDARY}")
    return plan


def _image_plan() -> RequestPlan:
    return for_api("openai").plan(
        "/v1/images/generations", {"model": "sd", "prompt": "a fox", "n": 2, "size": "512x512"}
    )


CASES = [
    Case(
        "the server's usage in the stream wins",
        chat_plan(),
        deltas({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}),
        "text/event-stream",
        tokenizer=True,
        expect={"prompt_tokens": 11, "completion_tokens": 3, "tokens_source": "server"},
    ),
    Case(
        "llama.cpp's timings when it sends no usage",
        chat_plan(),
        deltas(
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "timings": {"prompt_n": 4, "cache_n": 2, "predicted_n": 3},
            }
        ),
        "text/event-stream",
        expect={"prompt_tokens": 6, "completion_tokens": 3, "tokens_source": "server"},
    ),
    Case(
        "no usage: the tokenizer recounts the text and the templated prompt",
        chat_plan(),
        deltas(),
        "text/event-stream",
        tokenizer=True,
        expect={
            "prompt_tokens": CHAT_PROMPT,
            "completion_tokens": pieces("".join(ANSWER)),
            "tokens_source": "tokenizer",
        },
    ),
    Case(
        "no usage, no tokenizer: chunks counted, the prompt estimated from its bytes",
        chat_plan(),
        deltas(),
        "text/event-stream",
        expect={
            "prompt_tokens": 5,  # "how are you today ?": 19 bytes / 4, rounded up
            "completion_tokens": 3,
            "tokens_source": "estimate",
        },
    ),
    Case(
        "a zero prompt count is a placeholder: recounted",
        chat_plan(stream=False),
        json.dumps(
            {
                "choices": [{"index": 0, "message": {"content": "hello world"}}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 2},
            }
        ).encode(),
        tokenizer=True,
        expect={"prompt_tokens": CHAT_PROMPT, "completion_tokens": 2, "tokens_source": "tokenizer"},
    ),
    Case(
        "TGI's generated text without details, recounted with the tokenizer",
        RequestPlan(prompt_text="hello world"),
        json.dumps({"generated_text": "one two three"}).encode(),
        api="tgi",
        path="/generate",
        tokenizer=True,
        expect={
            "prompt_tokens": pieces("hello world") + 1,
            "completion_tokens": pieces("one two three"),
            "tokens_source": "tokenizer",
        },
    ),
    Case(
        "TGI's generated text, estimated without a tokenizer",
        RequestPlan(prompt_text="hello world"),
        json.dumps({"generated_text": "one two three"}).encode(),
        api="tgi",
        path="/generate",
        expect={"prompt_tokens": 3, "completion_tokens": 4, "tokens_source": "estimate"},
    ),
    Case(
        "TGI's counts in response headers fill what the body lacks",
        RequestPlan(),
        json.dumps({"generated_text": "one two three"}).encode(),
        api="tgi",
        path="/generate",
        headers={"x-prompt-tokens": "7", "x-generated-tokens": "3"},
        expect={"prompt_tokens": 7, "completion_tokens": 3, "tokens_source": "server"},
    ),
    Case(
        "a batch of inputs, each tokenized on its own",
        for_api("openai").plan("/v1/embeddings", {"model": "e", "input": ["hello world", "w1"]}),
        json.dumps({"data": []}).encode(),
        path="/v1/embeddings",
        tokenizer=True,
        expect={
            "prompt_tokens": pieces("hello world") + 1 + pieces("w1") + 1,
            "tokens_source": "tokenizer",
        },
    ),
    Case(
        "an upload: audio seconds from its header, the model from its form field, the text "
        "transcribed estimated",
        _upload_plan(),
        json.dumps({"text": "hi"}).encode(),
        path="/v1/audio/transcriptions",
        upload=form(wav(2.0)),
        expect={
            "audio_s": pytest.approx(2.0),
            "model": "whisper",
            "completion_tokens": 1,
            "tokens_source": "estimate",
        },
    ),
    Case(
        "images asked for, and what the request said of them",
        _image_plan(),
        json.dumps({"data": [{}, {}]}).encode(),
        path="/v1/images/generations",
        expect={"images": 2, "extra": {"image_size": "512x512"}},
    ),
    Case(
        "nothing to count",
        RequestPlan(),
        b"",
        path="/v1/models",
        expect={"prompt_tokens": None, "completion_tokens": None, "tokens_source": "none"},
    ),
]


@pytest.fixture(scope="module")
def counter(tmp_path_factory: pytest.TempPathFactory) -> TokenCounter:
    path: Path = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return TokenCounter(str(path)).load()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_resolve_usage(case: Case, counter: TokenCounter) -> None:
    api = for_api(case.api)
    tok = counter if case.tokenizer else None
    if case.upload is not None:
        assert case.plan.upload is not None
        case.plan.upload.feed(case.upload)
    stream = api.stream(case.path, case.ctype, case.plan, tok is not None)
    body = None
    if stream is not None:
        stream.feed(case.answer)
        stream.flush()
    elif case.answer:
        body = BodyUsage()
        body.feed(case.answer)
    headers = api.headers(case.path, case.headers)
    usage = resolve_usage(case.api, case.path, case.plan, tok, stream, body, headers)
    got = {k: getattr(usage, k) for k in case.expect}
    assert got == case.expect


def test_a_failed_parser_leaves_the_plan_to_count() -> None:
    """A stream parser dropped mid-answer (None) and no body: the prompt still counts."""
    usage = resolve_usage("openai", CHAT, chat_plan())
    assert (usage.prompt_tokens, usage.completion_tokens, usage.tokens_source) == (
        5,
        None,
        "estimate",
    )


@pytest.mark.parametrize(
    ("plan", "data", "expected"),
    [
        (RequestPlan(prompt_text="how are you today ?"), b"x" * 400, 5),  # the prompt's bytes
        (RequestPlan(), b"x" * 401, 100),  # no prompt found: the body's bytes / 4
        (RequestPlan(), None, 0),  # a body that streams through
    ],
)
def test_prompt_estimate(plan: RequestPlan, data: Any, expected: int) -> None:
    assert prompt_estimate(plan, data) == expected
