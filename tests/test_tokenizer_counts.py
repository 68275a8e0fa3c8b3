"""Token counts with the model's own tokenizer (a tiny word-level one built here, with a chat
template) when the server reports no usage, or a placeholder zero; the server's counts win
whenever they are real. The record says where its counts came from."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.standins import Recorder, StandIn, compact
from proxy.tokens import TokenCounter
from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config
from tests.helpers.tiny_model import build_tokenizer, pieces

MESSAGES = [
    {"role": "system", "content": "you are a helpful model"},
    {"role": "user", "content": "how are you today ?"},
]
# the chat template: "<role> : <content> </s> " per message, then "assistant :"
CHAT_PROMPT = sum(pieces(f"{m['role']} : {m['content']}") + 1 for m in MESSAGES) + 2
ANSWER = "hello world w1 w2 w3"
USAGE_ZEROS = (
    b'data: {"id":"q","choices":[],"usage":{"prompt_tokens":0,"completion_tokens":0,'
    b'"total_tokens":0}}\n\n'
)


@pytest.fixture
def tokenizer_path(tmp_path: Path) -> Path:
    return build_tokenizer(tmp_path / "tok")


class Quiet(Recorder):
    """An OpenAI-compatible server that reports no usage, or zeros (``zeros``)."""

    def __init__(self, zeros: bool = False) -> None:
        super().__init__()
        self.zeros = zeros

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    def _usage(self) -> dict[str, Any]:
        return {"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        extra = self._usage() if self.zeros else {}
        if not doc.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": ANSWER}}
                if "messages" in doc
                else {"index": 0, "text": ANSWER}
            )
            body = {"id": "q", "object": "chat.completion", "choices": [choice], **extra}
            return self.reply(compact(body), "application/json")
        resp = await self.open_stream(request, "text/event-stream")
        for i, word in enumerate(ANSWER.split()):
            piece = word if i == 0 else " " + word
            chunk = {"id": "q", "choices": [{"index": 0, "delta": {"content": piece}}]}
            await self.write(resp, b"data: " + compact(chunk) + b"\n\n")
        if self.zeros:
            last = {"id": "q", "choices": [], **extra}
            await self.write(resp, b"data: " + compact(last) + b"\n\n")
        await self.write(resp, b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        data = [{"index": i, "embedding": [0.5]} for i in range(len(doc["input"]))]
        return self.reply(compact({"object": "list", "data": data}), "application/json")


async def start(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    app: web.Application,
    model_path: Path | None,
) -> str:
    up = await aiohttp_server(app)
    extra = {"model_path": str(model_path)} if model_path else {}
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "openai", **extra))
    return url_of(proxy)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_without_real_usage_is_counted_with_the_tokenizer(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    tokenizer_path: Path,
    stream: bool,
    zeros: bool,
) -> None:
    quiet = Quiet(zeros=zeros)
    base = await start(aiohttp_server, make_proxy, tmp_path, quiet.app(), tokenizer_path)
    got = await call(
        base, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": stream}
    )
    sent = bytes(quiet.sent[-1])
    if stream and zeros:  # the proxy asked for usage; the client did not: the chunk is dropped
        assert USAGE_ZEROS in sent
        sent = sent.replace(USAGE_ZEROS, b"")
    assert got.body == sent
    rec = got.record
    assert rec["prompt_tokens"] == CHAT_PROMPT
    assert rec["completion_tokens"] == pieces(ANSWER)
    assert rec["tokens_source"] == "tokenizer"


async def test_completion_prompt_gets_special_tokens(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, tokenizer_path: Path
) -> None:
    base = await start(aiohttp_server, make_proxy, tmp_path, Quiet().app(), tokenizer_path)
    got = await call(base, "/v1/completions", {"model": "m", "prompt": "one two three"})
    assert got.record["prompt_tokens"] == 3 + 1  # <s> added, as the server would
    assert got.record["completion_tokens"] == pieces(ANSWER)


async def test_batch_embeddings_count_each_input(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, tokenizer_path: Path
) -> None:
    base = await start(aiohttp_server, make_proxy, tmp_path, Quiet().app(), tokenizer_path)
    inputs = ["hello world", "the lazy dog", "one"]
    got = await call(base, "/v1/embeddings", {"model": "m", "input": inputs})
    assert got.record["prompt_tokens"] == sum(pieces(t) + 1 for t in inputs)
    assert got.record["tokens_source"] == "tokenizer"


async def test_server_counts_win_over_the_tokenizer(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, tokenizer_path: Path
) -> None:
    standin = StandIn(flavor="vllm", scale=0.0)
    base = await start(aiohttp_server, make_proxy, tmp_path, standin.app(), tokenizer_path)
    for stream in (False, True):
        got = await call(
            base,
            "/v1/chat/completions",
            {"model": "m", "messages": MESSAGES, "max_tokens": 4, "stream": stream},
        )
        # the stand-in counts whitespace words: 5 + 5, not the tokenizer's count
        assert (got.record["prompt_tokens"], got.record["completion_tokens"]) == (10, 4)
        assert got.record["tokens_source"] == "server"


async def test_transformers_flavor_stream_without_usage(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, tokenizer_path: Path
) -> None:
    standin = StandIn(flavor="transformers", scale=0.0)
    base = await start(aiohttp_server, make_proxy, tmp_path, standin.app(), tokenizer_path)
    got = await call(
        base,
        "/v1/chat/completions",
        {"model": "m", "messages": MESSAGES, "max_tokens": 5, "stream": True},
    )
    assert got.record["completion_tokens"] == pieces("w0 w1 w2 w3 w4")
    assert got.record["prompt_tokens"] == CHAT_PROMPT
    assert got.record["tokens_source"] == "tokenizer"


def test_token_counter_against_independent_counts(tokenizer_path: Path) -> None:
    counter = TokenCounter(str(tokenizer_path))
    assert counter.count(ANSWER) == pieces(ANSWER)
    assert counter.count_prompt(None, ANSWER) == pieces(ANSWER) + 1
    assert counter.count_prompt(MESSAGES, "") == CHAT_PROMPT


def test_chat_templates_need_only_core_dependencies() -> None:
    """``pip install .`` must bring what ``apply_chat_template`` imports (jinja2): without it
    every templated prompt silently fell back to plain encoding (6 tokens for the server's 9)."""
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = {
        dep.split(">")[0].split("=")[0].split("[")[0].strip().lower()
        for dep in project["dependencies"]
    }
    assert {"transformers", "jinja2"} <= names


async def test_a_chat_template_that_fails_is_logged_once_and_plain_text_counted(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = build_tokenizer(tmp_path / "broken", chat_template="{{ raise_exception('no') }}")
    base = await start(aiohttp_server, make_proxy, tmp_path, Quiet().app(), broken)
    caplog.set_level(logging.WARNING, logger="wattproxy.tokens")
    for _ in range(3):
        got = await call(base, "/v1/chat/completions", {"model": "m", "messages": MESSAGES})
        # the prompt's texts, joined, with <s>: what counting without the template gives
        texts = "\n".join(m["content"] for m in MESSAGES)
        assert got.record["prompt_tokens"] == pieces(texts) + 1
    warnings = [r for r in caplog.records if r.name == "wattproxy.tokens"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert str(broken) in warnings[0].getMessage()
