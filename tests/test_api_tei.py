"""wattproxy in front of text-embeddings-inference: every native route and the OpenAI one, bytes
relayed unchanged, prompt tokens from ``x-compute-tokens`` or, without it, the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.standins.tei import TEI
from proxy.usage.tei import plan_request, usage_from_body, usage_from_headers
from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config
from tests.helpers.tiny_model import build_tokenizer, pieces

A, B, Q = "hello world", "the quick brown fox", "how are you"


async def start(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, tei: TEI, **upstream: Any
) -> str:
    up = await aiohttp_server(tei.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "tei", **upstream))
    return url_of(proxy)


@pytest.mark.parametrize(
    ("path", "body", "task", "prompt"),
    [
        ("/embed", {"inputs": A}, "feature-extraction", 4),
        ("/embed", {"inputs": [A, B], "normalize": True}, "feature-extraction", 4 + 6),
        ("/embed_sparse", {"inputs": [B]}, "feature-extraction", 6),
        (
            "/rerank",
            {"query": Q, "texts": [A, B], "return_text": True},
            "text-ranking",
            (3 + 2 + 3) + (3 + 4 + 3),
        ),
        ("/predict", {"inputs": B}, "text-classification", 6),
        ("/predict", {"inputs": [A, B]}, "text-classification", 2 + 2 + 4 + 1),  # a pair
        ("/predict", {"inputs": [[A, B], [B, A]]}, "text-classification", 2 * 9),
        ("/tokenize", {"inputs": A}, "other", 4),  # the tokens themselves, no inference
        ("/v1/embeddings", {"model": "bge", "input": [A, B]}, "feature-extraction", 10),
    ],
)
async def test_routes_relay_bytes_and_take_server_counts(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    path: str,
    body: dict[str, Any],
    task: str,
    prompt: int,
) -> None:
    tei = TEI()
    base = await start(aiohttp_server, make_proxy, tmp_path, tei)
    got = await call(base, path, body)
    assert got.status == 200
    assert got.body == bytes(tei.sent[-1])
    assert json.loads(tei.seen[-1].body) == body
    assert got.headers["X-Wattproxy-Task"] == task
    assert got.headers.get("x-compute-tokens") == (
        None if path.startswith(("/tok", "/v1")) else str(prompt)
    )
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (prompt, 0)
    assert rec["tokens_source"] == "server"
    assert rec["task"] == task


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/embed", {"inputs": [A, B]}, (pieces(A) + 1) + (pieces(B) + 1)),
        (
            "/rerank",
            {"query": Q, "texts": [A, B]},
            2 * (pieces(Q) + 1) + (pieces(A) + 1) + (pieces(B) + 1),
        ),
        ("/predict", {"inputs": A}, pieces(A) + 1),
    ],
)
async def test_without_token_headers_the_tokenizer_counts_each_input(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    path: str,
    body: dict[str, Any],
    expected: int,
) -> None:
    model = build_tokenizer(tmp_path / "tok")
    tei = TEI(token_headers=False)
    base = await start(aiohttp_server, make_proxy, tmp_path, tei, model_path=str(model))
    got = await call(base, path, body)
    assert got.body == bytes(tei.sent[-1])
    assert "x-compute-tokens" not in got.headers
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (expected, 0)
    assert rec["tokens_source"] == "tokenizer"


async def test_without_headers_or_tokenizer_it_is_an_estimate(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    base = await start(aiohttp_server, make_proxy, tmp_path, TEI(token_headers=False))
    got = await call(base, "/embed", {"inputs": "x" * 40})
    assert (got.record["prompt_tokens"], got.record["tokens_source"]) == (10, "estimate")


def test_plans_split_batches_and_pairs() -> None:
    assert plan_request("/embed", {"inputs": [A, B]}).prompt_parts == [A, B]
    assert plan_request("/rerank", {"query": Q, "texts": [A]}).prompt_parts == [Q, A]
    assert plan_request("/predict", {"inputs": [A, B]}).prompt_parts == [f"{A} {B}"]  # a pair
    assert plan_request("/predict", {"inputs": [[A, B], [B, A]]}).prompt_parts == [
        f"{A} {B}",
        f"{B} {A}",
    ]
    assert usage_from_headers("/embed", {"x-compute-tokens": "x"}) is None
    assert usage_from_headers("/embed", {"x-compute-tokens": "\u00b2"}) is None
    assert usage_from_headers("/embed", {"x-compute-tokens": "\u0661\u0662"}) is None
    tokens = [[{"id": 1}, {"id": 2}], [{"id": 3}]]
    u = usage_from_body("/tokenize", tokens)
    assert (u.prompt_tokens, u.completion_tokens, u.tokens_source) == (3, 0, "server")
    u = usage_from_body("/embed", [[0.1]])
    assert (u.prompt_tokens, u.completion_tokens, u.tokens_source) == (None, 0, "none")
