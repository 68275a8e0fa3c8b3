"""wattproxy in front of text-generation-inference: native and OpenAI routes, streamed and not,
bytes relayed unchanged, tokens from TGI's own reports (body, headers, stream events)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.standins.tgi import TGI
from proxy.usage.tgi import TGIStream, plan_request, usage_from_body, usage_from_headers
from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config
from tests.helpers.tiny_model import build_tokenizer, pieces

PROMPT = "hello world how are you"  # 5 words; TGI adds <s>: 6 prompt tokens


async def start(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, tgi: TGI, **upstream: Any
) -> str:
    up = await aiohttp_server(tgi.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "tgi", **upstream))
    return url_of(proxy)


@pytest.mark.parametrize(
    ("path", "params", "stream", "prompt", "completion"),
    [
        ("/generate", {"max_new_tokens": 5}, False, 6, 5),  # headers only
        ("/generate", {"max_new_tokens": 4, "details": True}, False, 6, 4),
        (
            "/generate",
            {"max_new_tokens": 3, "details": True, "decoder_input_details": True},
            False,
            6,
            3,
        ),
        ("/generate_stream", {"max_new_tokens": 7, "details": True}, True, 6, 7),
        ("/", {"max_new_tokens": 2}, False, 6, 2),  # compat: a list of one
        ("/", {"max_new_tokens": 5, "details": True}, True, 6, 5),  # compat, streamed
    ],
)
async def test_native_routes_relay_bytes_and_count_server_tokens(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    path: str,
    params: dict[str, Any],
    stream: bool,
    prompt: int,
    completion: int,
) -> None:
    tgi = TGI(keep_alive_first=True)
    base = await start(aiohttp_server, make_proxy, tmp_path, tgi)
    body: dict[str, Any] = {"inputs": PROMPT, "parameters": params}
    if path == "/":
        body["stream"] = stream
    got = await call(base, path, body)
    assert got.status == 200
    assert got.body == bytes(tgi.sent[-1])
    assert json.loads(tgi.seen[-1].body) == body  # the request went through untouched
    assert got.headers["X-Wattproxy-Task"] == "text-generation"
    assert got.headers["Content-Type"].startswith("text/event-stream" if stream else "application")
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (prompt, completion)
    assert rec["tokens_source"] == "server"
    assert rec["task"] == "text-generation"
    assert rec["upstream"] == "x"


async def test_stream_without_details_counts_events_and_tokenizes_the_prompt(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    model = build_tokenizer(tmp_path / "tok")
    tgi = TGI(eos_after=3)  # three words, then </s>: four tokens generated
    base = await start(aiohttp_server, make_proxy, tmp_path, tgi, model_path=str(model))
    got = await call(base, "/generate_stream", {"inputs": PROMPT, "parameters": {}})
    assert got.body == bytes(tgi.sent[-1])
    assert got.body.count(b"data:{") == 4
    rec = got.record
    assert rec["completion_tokens"] == 4  # the special </s> is a generated token too
    assert rec["prompt_tokens"] == pieces(PROMPT) + 1  # the model's tokenizer, with <s>
    assert rec["tokens_source"] == "tokenizer"  # the less certain of the two counts


async def test_openai_route_stream_keeps_tgi_usage_nulls(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    tgi = TGI()
    base = await start(aiohttp_server, make_proxy, tmp_path, tgi)
    req = {
        "model": "tgi",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": 3,
    }
    got = await call(base, "/v1/chat/completions", req)
    sent = bytes(tgi.sent[-1])
    # the proxy asked for usage; the client gets exactly TGI's stream without the usage chunk
    assert json.loads(tgi.seen[-1].body)["stream_options"] == {"include_usage": True}
    usage_chunk = [e for e in sent.split(b"\n\n") if b'"choices":[]' in e]
    assert len(usage_chunk) == 1
    assert got.body == sent.replace(usage_chunk[0] + b"\n\n", b"")
    assert got.body.count(b'"usage":null') == 3
    assert (got.record["prompt_tokens"], got.record["completion_tokens"]) == (6, 3)
    assert got.record["tokens_source"] == "server"


async def test_openai_route_non_stream(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    tgi = TGI()
    base = await start(aiohttp_server, make_proxy, tmp_path, tgi)
    got = await call(base, "/v1/completions", {"model": "tgi", "prompt": PROMPT, "max_tokens": 2})
    assert got.body == bytes(tgi.sent[-1])
    assert (got.record["prompt_tokens"], got.record["completion_tokens"]) == (6, 2)


# -- the parser alone ---------------------------------------------------------------------------

STREAM = (
    b":\n\n"
    b'data:{"index":1,"token":{"id":5,"text":"a","logprob":-0.1,"special":false},'
    b'"generated_text":null,"details":null}\n\n'
    b'data:{"index":2,"token":{"id":2,"text":"</s>","logprob":-0.2,"special":true},'
    b'"generated_text":"a","details":{"finish_reason":"eos_token","generated_tokens":2,'
    b'"seed":null,"input_length":9}}\n\n'
)


@pytest.mark.parametrize("step", [1, 2, 5, 17, 1000])
def test_tgi_stream_parser_any_split(step: int) -> None:
    parser = TGIStream()
    out = b"".join(parser.feed(STREAM[i : i + step]) for i in range(0, len(STREAM), step))
    assert out + parser.flush() == STREAM
    assert parser.tokens == 2
    assert parser.generated_text == "a"
    usage = parser.finish()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.tokens_source) == (9, 2, "server")


def test_tgi_error_event_is_not_a_token() -> None:
    parser = TGIStream()
    parser.feed(b'data:{"error":"Request failed during generation","error_type":"generation"}\n\n')
    assert parser.tokens == 0
    assert parser.finish().completion_tokens == 0


def test_tgi_plan_and_bodies() -> None:
    plan = plan_request("/", {"inputs": "a b", "parameters": {"max_new_tokens": 9}, "stream": True})
    assert (plan.prompt_text, plan.max_tokens, plan.stream) == ("a b", 9, True)
    assert not plan_request("/generate", {"inputs": "a"}).stream
    assert plan_request("/generate_stream", {"inputs": "a"}).stream
    u = usage_from_body(
        "/", [{"generated_text": "x y", "details": {"generated_tokens": 2, "prefill": []}}]
    )
    assert (u.prompt_tokens, u.completion_tokens) == (None, 2)
    u = usage_from_body("/generate", {"generated_text": "x y"})
    assert (u.completion_tokens, u.generated_text) == (None, "x y")
    h = usage_from_headers("/generate", {"x-prompt-tokens": "4", "x-generated-tokens": "7"})
    assert h is not None and (h.prompt_tokens, h.completion_tokens) == (4, 7)
    assert usage_from_headers("/generate", {"x-prompt-tokens": "n/a"}) is None
    # digits to str.isdigit() that int() refuses or reads: not a count, and no exception
    assert usage_from_headers("/generate", {"x-prompt-tokens": "\u00b2"}) is None
    h = usage_from_headers(
        "/generate", {"x-prompt-tokens": "\u0661\u0662", "x-generated-tokens": "3"}
    )
    assert h is not None and (h.prompt_tokens, h.completion_tokens) == (None, 3)
