"""Energy in the answer (issue 15, item 2): the splice itself (a table and a property), the
stream parser's final usage chunk, and the whole path through a real ``wattproxy serve``:
off by default and byte-identical, on by request header or by config, only where the client
asked for usage, and every byte but the added fields as the upstream sent it."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.standins import StandIn
from proxy.usage.energy_splice import (
    UsageSplicer,
    energy_fields,
    splice_event,
    splice_usage,
)
from proxy.usage.openai import OpenAISSE
from tests.conftest import url_of
from tests.helpers.openai_replays import (
    NON_STREAM,
    USAGE,
    VLLM_CLIENT_VIEW,
    VLLM_WITH_USAGE,
)
from tests.helpers.serve import base_config, serve_process

FIG = (12.5, 0.00123, "measured")
ADDED = b',"energy_j":12.5,"co2e_g":0.00123,"source":"measured","final":false'
FIRST = ADDED[1:]


# -- the splice ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (b'{"usage":{"a":1}}', b'{"usage":{"a":1' + ADDED + b"}}"),
        (b'{"usage":{}}', b'{"usage":{' + FIRST + b"}}"),
        (b'{"usage":{ \n }}', b'{"usage":{ \n ' + FIRST + b"}}"),
        (b'{ "usage" : { "a" : 1 } }', b'{ "usage" : { "a" : 1 ' + ADDED + b"} }"),
        (b'{"usage":{"a":1},"z":[1,{"u":2}]}', b'{"usage":{"a":1' + ADDED + b'},"z":[1,{"u":2}]}'),
        (
            b'{"usage":{"d":{"c":1},"e":[1,{"f":"}"}]}}',
            b'{"usage":{"d":{"c":1},"e":[1,{"f":"}"}]' + ADDED + b"}}",
        ),
        # only the top-level usage: not one deeper, not one inside a string
        (
            b'{"x":{"usage":{"a":1}},"t":"\\"usage\\":{}","usage":{"b":2}}',
            b'{"x":{"usage":{"a":1}},"t":"\\"usage\\":{}","usage":{"b":2' + ADDED + b"}}",
        ),
        (b'{"choices":[{"usage":{}}]}', b'{"choices":[{"usage":{}}]}'),  # no top-level usage
        (b'{"usage":null}', b'{"usage":null}'),
        (b'{"usage":[1]}', b'{"usage":[1]}'),
        (b'[{"usage":{}}]', b'[{"usage":{}}]'),  # not an object
        (b'{"us\\u0061ge":{}}', b'{"us\\u0061ge":{}}'),  # an escaped name is not looked into
        (b'{"usages":{}}', b'{"usages":{}}'),
        (b"not json", b"not json"),
        (b"", b""),
    ],
)
def test_splice_table(document: bytes, expected: bytes) -> None:
    assert splice_usage(document, FIG) == expected
    if expected != document:
        json.loads(expected)


def test_splice_leaves_figures_it_cannot_write() -> None:
    doc = b'{"usage":{"a":1}}'
    assert splice_usage(doc, (float("nan"), 0.0, "measured")) == doc
    assert splice_usage(doc, (1.0, float("inf"), "measured")) == doc
    assert splice_usage(doc, (1.0, 1.0, "guessed")) == doc
    assert energy_fields((1.0, 2e-9, "estimated")) == (
        b',"energy_j":1.0,"co2e_g":2e-09,"source":"estimated","final":false'
    )


def test_splice_gives_up_past_its_window() -> None:
    doc = b'{"pad":"' + b"x" * 100 + b'","usage":{"a":1}}'
    splicer = UsageSplicer(lambda: FIG, scan_limit_bytes=50)
    assert splicer.feed(doc[:40]) + splicer.feed(doc[40:]) == doc
    assert not splicer.spliced


def test_splice_asks_for_figures_at_the_brace() -> None:
    calls: list[int] = []

    def figures() -> tuple[float, float, str]:
        calls.append(1)
        return FIG

    splicer = UsageSplicer(figures)
    assert splicer.feed(b'{"usage":{"a":1') == b'{"usage":{"a":1'
    assert calls == []
    assert splicer.feed(b"},") == ADDED + b"},"
    assert calls == [1]
    assert splicer.feed(b'"usage":{}}') == b'"usage":{}}'  # once only
    assert calls == [1]


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_names = st.sampled_from(["usage", "u", "usage ", "x", '"', "\\", "}", "{"]) | st.text(max_size=8)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_names, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    before=st.dictionaries(_names.filter(lambda k: k != "usage"), _values, max_size=4),
    usage=st.dictionaries(_names, _values, max_size=4),
    after=st.dictionaries(_names.filter(lambda k: k != "usage"), _values, max_size=4),
    indent=st.sampled_from([None, 0, 2]),
    separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
    ascii_only=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
)
def test_splice_property(
    before: dict[str, Any],
    usage: dict[str, Any],
    after: dict[str, Any],
    indent: int | None,
    separators: tuple[str, str],
    ascii_only: bool,
    cuts: list[int],
) -> None:
    """Whatever the document and however it is cut: it still parses, the usage object has the
    four fields and nothing else changed, and every other byte is where it was."""
    doc = {**before, "usage": usage, **{k: v for k, v in after.items() if k not in before}}
    text = json.dumps(doc, indent=indent, separators=separators, ensure_ascii=ascii_only)
    original = text.encode()
    splicer = UsageSplicer(lambda: FIG)
    bounds = sorted({c % (len(original) + 1) for c in cuts} | {0, len(original)})
    out = b"".join(splicer.feed(original[a:b]) for a, b in itertools.pairwise(bounds))
    assert splicer.spliced
    added = FIRST if not usage else ADDED
    at = next(i for i in range(len(original)) if out[i] != original[i])
    assert out[at : at + len(added)] == added
    assert out[:at] + out[at + len(added) :] == original
    parsed = json.loads(out)
    figures = {"energy_j": 12.5, "co2e_g": 0.00123, "source": "measured", "final": False}
    assert parsed == {**doc, "usage": {**usage, **figures}}


# -- the stream parser -----------------------------------------------------------------------


def _feed(parser: OpenAISSE, data: bytes, size: int) -> bytes:
    out = b"".join(parser.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + parser.flush()


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_stream_final_usage_chunk(size: int) -> None:
    end = b'"completion_tokens":3'
    spliced_usage = USAGE.replace(end + b"}", end + ADDED + b"}")
    assert splice_event(USAGE, lambda: FIG) == spliced_usage
    parser = OpenAISSE(energy=lambda: FIG)
    assert _feed(parser, VLLM_WITH_USAGE, size) == VLLM_WITH_USAGE.replace(USAGE, spliced_usage)
    assert parser.finish().completion_tokens == 3
    # asked by the proxy, not the client: the usage chunk is still taken out, not spliced
    stripping = OpenAISSE(strip_usage=True, energy=lambda: FIG)
    assert _feed(stripping, VLLM_WITH_USAGE, size) == VLLM_CLIENT_VIEW
    assert _feed(OpenAISSE(energy=lambda: FIG), VLLM_CLIENT_VIEW, size) == VLLM_CLIENT_VIEW


# -- through wattproxy serve -----------------------------------------------------------------

_FIELDS = re.compile(
    rb',"energy_j":(-?[0-9.e+-]+),"co2e_g":(-?[0-9.e+-]+),"source":"(measured|estimated)"'
    rb',"final":false'
)


class Replay:
    """An upstream that answers with vLLM's bytes (``openai_replays``) and keeps the headers
    each request came with."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if doc.get("model") == "bad":
            return web.Response(body=ERROR, status=400, content_type="application/json")
        if not doc.get("stream"):
            return web.Response(body=NON_STREAM, content_type="application/json")
        asked = (doc.get("stream_options") or {}).get("include_usage")
        body = VLLM_WITH_USAGE if asked else VLLM_CLIENT_VIEW
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in body.split(b"\n\n")[:-1]:
            await resp.write(event + b"\n\n")
        await resp.write_eof()
        return resp


def _added(got: bytes, sent: bytes) -> tuple[float, float, str]:
    """The figures ``got`` has beyond ``sent``: one insertion of the four fields, just before
    the closing brace of the usage object, every other byte as sent."""
    m = _FIELDS.search(got)
    assert m is not None, got
    assert got[: m.start()] + got[m.end() :] == sent
    assert got[: m.start()].endswith(b'"completion_tokens":3') or got[: m.start()].endswith(
        b'"completion_tokens":2'
    )
    assert got[m.end() : m.end() + 1] == b"}"
    energy_j, co2e_g = float(m.group(1)), float(m.group(2))
    assert energy_j >= 0 and co2e_g >= 0
    return energy_j, co2e_g, m.group(3).decode()


async def _chat(
    s: aiohttp.ClientSession, base: str, body: dict[str, Any], opt_in: bool
) -> tuple[bytes, Any]:
    headers = {"X-Wattproxy-Energy": "include"} if opt_in else {}
    async with s.post(base + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        return await r.read(), r.headers


#: an error answer that happens to hold a usage object: never rewritten
ERROR = b'{"error":{"message":"no","type":"BadRequestError","code":400},"usage":{"a":1}}'

STREAM_USAGE = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
STREAM = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
PLAIN = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_serve_off_by_default_and_by_header(aiohttp_server: Any, tmp_path: Path) -> None:
    replay = Replay()
    up = await aiohttp_server(replay.app())
    doc = base_config(url_of(up), tmp_path)
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        # off by default: every answer byte-identical, Content-Length kept, no header
        assert (await _chat(s, served.base, STREAM_USAGE, False))[0] == VLLM_WITH_USAGE
        assert (await _chat(s, served.base, STREAM, False))[0] == VLLM_CLIENT_VIEW
        body, headers = await _chat(s, served.base, PLAIN, False)
        assert body == NON_STREAM
        assert headers["Content-Length"] == str(len(NON_STREAM))
        assert "X-Wattproxy-Energy-Estimate-J" not in headers
        # opted in by header: the final usage chunk gains the fields
        body, headers = await _chat(s, served.base, STREAM_USAGE, True)
        _added(body, VLLM_WITH_USAGE)
        assert "X-Wattproxy-Energy-Estimate-J" not in headers  # streamed: no estimate head
        # a stream whose client did not ask for usage: none injected, byte-identical
        assert (await _chat(s, served.base, STREAM, True))[0] == VLLM_CLIENT_VIEW
        # non-streamed: usage gains the fields, chunked, and the estimate header
        body, headers = await _chat(s, served.base, PLAIN, True)
        _added(body, NON_STREAM)
        assert "Content-Length" not in headers
        assert float(headers["X-Wattproxy-Energy-Estimate-J"]) > 0
        # an error answer stays as the upstream sent it
        headers = {"X-Wattproxy-Energy": "include"}
        bad = {**PLAIN, "model": "bad"}
        async with s.post(served.base + "/v1/chat/completions", json=bad, headers=headers) as r:
            assert r.status == 400
            assert await r.read() == ERROR
            assert r.headers["Content-Length"] == str(len(ERROR))
            assert "X-Wattproxy-Energy-Estimate-J" not in r.headers
    assert all("x-wattproxy-energy" not in h for h in replay.headers)  # never sent upstream


async def test_serve_on_by_config(aiohttp_server: Any, tmp_path: Path) -> None:
    replay = Replay()
    up = await aiohttp_server(replay.app())
    doc = base_config(url_of(up), tmp_path, response={"energy_in_usage": True})
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        _added((await _chat(s, served.base, STREAM_USAGE, False))[0], VLLM_WITH_USAGE)
        assert (await _chat(s, served.base, STREAM, False))[0] == VLLM_CLIENT_VIEW
        body, headers = await _chat(s, served.base, PLAIN, False)
        _added(body, NON_STREAM)
        assert float(headers["X-Wattproxy-Energy-Estimate-J"]) > 0


async def test_serve_standin_answer(aiohttp_server: Any, tmp_path: Path) -> None:
    """The stand-in vLLM's own answers: parsed, the usage holds its counts and the figures."""
    up = await aiohttp_server(StandIn(flavor="vllm", scale=0.0).app())
    doc = base_config(url_of(up), tmp_path)
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        body, headers = await _chat(s, served.base, {**PLAIN, "max_tokens": 4}, True)
        usage = json.loads(body)["usage"]
        assert usage["completion_tokens"] == 4
        assert usage["source"] in ("measured", "estimated") and usage["final"] is False
        assert usage["energy_j"] >= 0 and usage["co2e_g"] >= 0
        assert float(headers["X-Wattproxy-Energy-Estimate-J"]) > 0
        body, _ = await _chat(s, served.base, {**STREAM_USAGE, "max_tokens": 4}, True)
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
        final = json.loads(events[-1][6:])
        assert final["choices"] == [] and final["usage"]["final"] is False
        assert all(b"energy_j" not in e for e in events[:-1])
