"""wattproxy in front of Ollama: NDJSON streams by default, single objects with
``"stream": false``, counts and durations from the ``done`` object, the cached-prompt quirk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.standins.ollama import EVAL_NS_PER_TOKEN, LOAD_NS, Ollama
from proxy.usage.base import MAX_EVENT_BYTES
from proxy.usage.ollama import NDJSONFramer, OllamaStream, plan_request, usage_from_body
from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config
from tests.helpers.tiny_model import build_tokenizer, pieces

PROMPT = "why is the sky blue"  # 5 words


async def start(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, ollama: Ollama, **upstream: Any
) -> str:
    up = await aiohttp_server(ollama.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "ollama", **upstream))
    return url_of(proxy)


@pytest.mark.parametrize(
    ("path", "body", "ctype"),
    [
        ("/api/generate", {"model": "llama3.2", "prompt": PROMPT}, "application/x-ndjson"),
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": PROMPT, "stream": False},
            "application/json",
        ),
        (
            "/api/chat",
            {"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}]},
            "application/x-ndjson",
        ),
        (
            "/api/chat",
            {
                "model": "llama3.2",
                "messages": [{"role": "user", "content": PROMPT}],
                "stream": False,
            },
            "application/json",
        ),
    ],
)
async def test_generate_and_chat_streamed_by_default_or_not(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    path: str,
    body: dict[str, Any],
    ctype: str,
) -> None:
    ollama = Ollama(default_predict=6)
    base = await start(aiohttp_server, make_proxy, tmp_path, ollama)
    got = await call(base, path, body)
    assert got.status == 200
    assert got.headers["Content-Type"].startswith(ctype)
    assert got.body == bytes(ollama.sent[-1])
    assert json.loads(ollama.seen[-1].body) == body
    if ctype == "application/x-ndjson":
        assert got.body.count(b"\n") == 7  # six tokens and the done line
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (5, 6)
    assert rec["tokens_source"] == "server"
    assert rec["task"] == "text-generation"
    assert rec["model"] == "llama3.2"
    assert rec["eval_duration_s"] == pytest.approx(6 * EVAL_NS_PER_TOKEN / 1e9)
    assert rec["load_duration_s"] == pytest.approx(LOAD_NS / 1e9)
    assert rec["done_reason"] == "length"


async def test_cached_prompt_has_no_count_and_is_tokenized(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    model = build_tokenizer(tmp_path / "tok")
    ollama = Ollama(default_predict=3)
    base = await start(aiohttp_server, make_proxy, tmp_path, ollama, model_path=str(model))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}]}
    first = await call(base, "/api/chat", body)
    again = await call(base, "/api/chat", body)
    assert b"prompt_eval_count" in first.body
    assert b"prompt_eval_count" not in again.body  # Ollama omits the zero of a cached prompt
    assert (first.record["prompt_tokens"], first.record["tokens_source"]) == (5, "server")
    # the chat template applied: "user : <prompt> </s> assistant :"
    expected = pieces(f"user : {PROMPT} assistant :") + 1
    assert (again.record["prompt_tokens"], again.record["completion_tokens"]) == (expected, 3)
    assert again.record["tokens_source"] == "tokenizer"


async def test_embed_counts_and_num_predict(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    ollama = Ollama()
    base = await start(aiohttp_server, make_proxy, tmp_path, ollama)
    got = await call(base, "/api/embed", {"model": "all-minilm", "input": ["a b", "c d e"]})
    assert got.body == bytes(ollama.sent[-1])
    assert got.record["task"] == "feature-extraction"
    assert (got.record["prompt_tokens"], got.record["completion_tokens"]) == (5, 0)
    got = await call(
        base,
        "/api/generate",
        {"model": "m", "prompt": "a b", "stream": False, "options": {"num_predict": 2}},
    )
    assert b'"response":"w0 w1 \\u003c\\u0026\\u003e"' in got.body
    assert got.body == bytes(ollama.sent[-1])  # Go's HTML escapes relayed untouched
    assert got.record["completion_tokens"] == 2
    tags = await call(base, "/api/tags", method="GET")
    assert tags.record["task"] == "other"


# -- the parser alone ---------------------------------------------------------------------------

LINES = (
    b'{"model":"m","created_at":"t","response":"The","done":false}\n'
    b'{"model":"m","created_at":"t","response":" sky","done":false}\n'
    b'{"model":"m","created_at":"t","response":"","done":true,"done_reason":"stop",'
    b'"total_duration":2000000000,"prompt_eval_count":26,"eval_count":2,'
    b'"eval_duration":500000000}\n'
)


@pytest.mark.parametrize("step", [1, 3, 8, 60, 10_000])
def test_ndjson_parser_any_split(step: int) -> None:
    parser = OllamaStream(collect_text=True)
    out = b"".join(parser.feed(LINES[i : i + step]) for i in range(0, len(LINES), step))
    assert out + parser.flush() == LINES
    assert parser.tokens == 2
    assert parser.done
    assert parser.text == "The sky"
    usage = parser.finish()
    assert (usage.prompt_tokens, usage.completion_tokens) == (26, 2)
    assert usage.extra["total_duration_s"] == 2.0
    assert usage.extra["eval_duration_s"] == 0.5


def test_broken_off_stream_counts_what_came() -> None:
    parser = OllamaStream()
    parser.feed(LINES[:90])
    usage = parser.finish()
    assert (usage.completion_tokens, usage.tokens_source) == (1, "estimate")


def test_ndjson_framer_is_bounded() -> None:
    framer = NDJSONFramer()
    big = b"x" * (MAX_EVENT_BYTES + 10)
    out = list(framer.push(big))
    assert out == [big] and framer.oversize
    assert framer.pending() == b""
    assert list(framer.push(b'{"a":1}\n{"b"')) == [b'{"a":1}\n']
    assert framer.pending() == b'{"b"'


def test_plan_streams_by_default() -> None:
    assert plan_request("/api/generate", {"model": "m", "prompt": "p"}).stream
    assert not plan_request("/api/generate", {"model": "m", "prompt": "p", "stream": False}).stream
    assert not plan_request("/api/embed", {"model": "m", "input": "p"}).stream
    plan = plan_request(
        "/api/chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "options": {"num_predict": 12},
        },
    )
    assert (plan.model, plan.max_tokens, plan.prompt_text) == ("m", 12, "x")
    u = usage_from_body("/api/generate", {"response": "a b", "done": True, "eval_count": 2})
    assert (u.prompt_tokens, u.completion_tokens) == (None, 2)
