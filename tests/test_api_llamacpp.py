"""wattproxy in front of llama.cpp's two servers (byte-exact replays in proxy/standins/llamacpp.py):
every generated token is counted, the empty-text ones included, and the server's own figures
(``usage``, else ``timings``) win wherever it sends them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.standins.llamacpp import (
    LLAMA_CPP_PYTHON,
    PY_GENERATED,
    SERVER_GENERATED,
    SERVER_PROMPT,
    LlamaCpp,
    llama_server_stream,
)
from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config
from tests.helpers.tiny_model import build_tokenizer, pieces

CHAT = {"model": "m", "messages": [{"role": "user", "content": "say hi"}], "stream": True}


async def start(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, flavor: str
) -> tuple[LlamaCpp, str]:
    server = LlamaCpp(flavor)
    up = await aiohttp_server(server.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "openai"))
    return server, url_of(proxy)


async def test_llama_cpp_python_tokens_with_empty_text_are_counted(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """No usage in its streams: one token per generated chunk, ``"content": ""`` included."""
    _, base = await start(aiohttp_server, make_proxy, tmp_path, "python")
    got = await call(base, "/v1/chat/completions", CHAT)
    assert got.body == LLAMA_CPP_PYTHON
    rec = got.record
    assert rec["completion_tokens"] == PY_GENERATED
    assert rec["tokens_source"] == "estimate"


async def test_a_tokenizer_never_counts_fewer_tokens_than_generated_chunks(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The text left of six tokens ("Hi there!") is three tokens to a tokenizer: each generated
    chunk held one token at least, so the chunks' count stands."""
    server = LlamaCpp("python")
    up = await aiohttp_server(server.app())
    tok = build_tokenizer(tmp_path / "tok")
    cfg = upstream_config(url_of(up), tmp_path, "openai", model_path=str(tok))
    proxy, _ = await make_proxy(cfg)
    got = await call(url_of(proxy), "/v1/chat/completions", CHAT)
    assert got.body == LLAMA_CPP_PYTHON
    assert pieces("Hi there!") == 3
    assert (got.record["completion_tokens"], got.record["tokens_source"]) == (
        PY_GENERATED,
        "estimate",
    )


async def test_llama_server_usage_wins_over_chunk_counting(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The client asked for usage: the stream passes untouched and its usage is recorded (the
    emoji's four tokens came in one chunk, so counting chunks would say 4 instead of 7)."""
    _, base = await start(aiohttp_server, make_proxy, tmp_path, "server")
    got = await call(
        base, "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}
    )
    assert got.body == llama_server_stream(include_usage=True)
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (SERVER_PROMPT, SERVER_GENERATED)
    assert rec["tokens_source"] == "server"


async def test_llama_server_timings_count_when_it_sends_no_usage(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A request the proxy forwards untouched (``continuous_usage_stats``, which llama-server
    ignores) gets no usage, only ``timings``: ``predicted_n``, and ``prompt_n`` + ``cache_n``."""
    server, base = await start(aiohttp_server, make_proxy, tmp_path, "server")
    body = {**CHAT, "stream_options": {"continuous_usage_stats": True}}
    got = await call(base, "/v1/chat/completions", body)
    assert got.body == llama_server_stream(include_usage=False) == bytes(server.sent[-1])
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (SERVER_PROMPT, SERVER_GENERATED)
    assert rec["tokens_source"] == "server"


async def test_llama_server_client_that_asked_nothing_gets_the_direct_bytes(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    _, base = await start(aiohttp_server, make_proxy, tmp_path, "server")
    got = await call(base, "/v1/chat/completions", CHAT)
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (SERVER_PROMPT, SERVER_GENERATED)
    assert got.body == llama_server_stream(include_usage=False)
