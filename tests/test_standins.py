"""The stand-in package (``proxy.standins``): its surface, the OpenAI stand-ins' JSON against
vLLM's real bytes, and the benchmarks' ``FastStandIn`` through the proxy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import proxy.reports
import proxy.standins
from proxy.standins import FastStandIn, StandIn
from proxy.standins.openai import FAST_CHUNKS, FAST_PROMPT_TOKENS
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.openai_replays import NON_STREAM, ROLE, chunk
from tests.helpers.serve import ROOT
from tests.helpers.through_proxy import CHAT, final_record


def shape(value: Any) -> Any:
    """The keys of every object, in order, and the shape of every list's first item."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


@pytest.mark.parametrize("package", [proxy.standins, proxy.reports])
def test_each_name_in_all_is_there_once(package: Any) -> None:
    names = package.__all__
    assert len(names) == len(set(names))
    assert [n for n in names if not hasattr(package, n)] == []


def test_the_pure_reports_load_without_aiohttp_redis_or_prometheus() -> None:
    """``proxy.reports`` (build, tables, HTML page) is pure: only ``reports.api`` needs aiohttp."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('aiohttp', 'redis', 'prometheus_client'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import proxy.reports\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("server", ["standin", "fast"])
async def test_openai_stand_ins_write_vllms_fields_in_vllms_order(
    aiohttp_server: Any, server: str
) -> None:
    app = StandIn(scale=0.0).app() if server == "standin" else FastStandIn().app()
    up = await aiohttp_server(app)
    async with aiohttp.ClientSession() as s:
        async with s.post(url_of(up) + "/v1/chat/completions", json=CHAT) as r:
            body = await r.read()
        async with s.post(url_of(up) + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            stream = await r.read()
    assert shape(json.loads(body)) == shape(json.loads(NON_STREAM))
    events = [e for e in stream.split(b"\n\n") if e and e != b"data: [DONE]"]
    real = {"role": ROLE, "content": chunk("a")}
    for event in events:
        doc = json.loads(event.removeprefix(b"data: "))
        kind = "role" if "role" in doc["choices"][0]["delta"] else "content"
        doc["choices"][0]["finish_reason"] = None  # the real one is null, ours may be "length"
        assert shape(doc) == shape(json.loads(real[kind].strip().removeprefix(b"data: ")))


@pytest.mark.parametrize("stream", [False, True])
async def test_the_bench_upstream_through_the_proxy_is_counted_by_its_usage(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, stream: bool
) -> None:
    up = await aiohttp_server(FastStandIn().app())
    proxy, _ = await make_proxy(proxy_config(url_of(up), tmp_path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json={**CHAT, "stream": stream}) as r,
    ):
        assert r.status == 200
        got = await r.read()
        rid = r.headers["X-Request-Id"]
    assert got.endswith(b"data: [DONE]\n\n") == stream
    rec = await final_record(url_of(proxy), rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (FAST_PROMPT_TOKENS, FAST_CHUNKS)
    assert rec["tokens_source"] == "server"


async def test_a_held_stream_waits_for_release(aiohttp_server: Any) -> None:
    up = await aiohttp_server(FastStandIn().app())
    body = {**CHAT, "model": "hold", "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(up) + "/v1/chat/completions", json=body) as r,
    ):
        first = await r.content.readuntil(b"\n\n")
        assert b'"content":"w0"' in first
        async with s.get(url_of(up) + "/bench/held") as held:
            assert await held.text() == "1"
        async with s.get(url_of(up) + "/bench/release") as released:
            assert released.status == 200
        rest = await r.read()
    assert rest.count(b"data: {") == FAST_CHUNKS - 1
    assert rest.endswith(b"data: [DONE]\n\n")
