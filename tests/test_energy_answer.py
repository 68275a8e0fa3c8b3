"""Energy in the answer (issue 15, item 2): the splice itself (a table and a property), the
stream parser's final usage chunk, and the whole path through a real ``wattproxy serve``:
off by default and byte-identical, on by request header or by config, only where the client
asked for usage, and every byte but the added fields as the upstream sent it."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.standins import TGI, Ollama, OpenAIExtra, Recorder, StandIn
from proxy.standins.ollama import EVAL_NS_PER_TOKEN
from proxy.usage import for_api
from proxy.usage.energy_splice import (
    UsageSplicer,
    energy_fields,
    splice_event,
    splice_usage,
)
from proxy.usage.openai import OpenAISSE
from tests.conftest import ProxyFactory, url_of
from tests.helpers.openai_replays import (
    NON_STREAM,
    USAGE,
    VLLM_CLIENT_VIEW,
    VLLM_WITH_USAGE,
)
from tests.helpers.serve import base_config, final_record, serve_process
from tests.helpers.through_proxy import call, upstream_config

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


# -- the other APIs' streams: usage nested, or no usage object at all ------------------------

RESPONSE_USAGE = (b"response", b"usage")


@pytest.mark.parametrize(
    ("document", "path", "expected"),
    [
        # nested: the Responses API's response.usage
        (
            b'{"type":"response.completed","response":{"id":"r","usage":{"a":1},"user":null}}',
            RESPONSE_USAGE,
            b'{"type":"response.completed","response":{"id":"r","usage":{"a":1'
            + ADDED
            + b'},"user":null}}',
        ),
        (
            b'{"usage":{"a":1},"response":{"x":{"usage":{}},"usage":{}}}',
            RESPONSE_USAGE,
            b'{"usage":{"a":1},"response":{"x":{"usage":{}},"usage":{' + FIRST + b"}}}",
        ),
        # the key path must match level by level
        (b'{"response":{"usage":null}}', RESPONSE_USAGE, b'{"response":{"usage":null}}'),
        (b'{"response":null,"usage":{}}', RESPONSE_USAGE, b'{"response":null,"usage":{}}'),
        (b'{"response":{},"usage":{}}', RESPONSE_USAGE, b'{"response":{},"usage":{}}'),
        (b'{"usage":{"response":{}}}', RESPONSE_USAGE, b'{"usage":{"response":{}}}'),
        (b'{"x":{"response":{"usage":{}}}}', RESPONSE_USAGE, b'{"x":{"response":{"usage":{}}}}'),
        # TGI's details
        (
            b'{"index":3,"details":{"generated_tokens":3,"input_length":4}}',
            (b"details",),
            b'{"index":3,"details":{"generated_tokens":3,"input_length":4' + ADDED + b"}}",
        ),
        (b'{"index":3,"details":null}', (b"details",), b'{"index":3,"details":null}'),
        # the document itself: Ollama's done line, whose counts are top-level members
        (
            b'{"done":true,"eval_count":3}\n',
            (),
            b'{"done":true,"eval_count":3' + ADDED + b"}\n",
        ),
        (b'{"s":"}","o":{"}":[1]}}', (), b'{"s":"}","o":{"}":[1]}' + ADDED + b"}"),
        (b"{}", (), b"{" + FIRST + b"}"),
        (b"[{}]", (), b"[{}]"),
    ],
)
def test_splice_at_a_key_path(document: bytes, path: tuple[bytes, ...], expected: bytes) -> None:
    assert UsageSplicer(lambda: FIG, path=path).feed(document) == expected
    if expected != document:
        json.loads(expected)


@settings(max_examples=200)
@given(
    outer=st.dictionaries(_names.filter(lambda k: k != "response"), _values, max_size=3),
    inner=st.dictionaries(_names.filter(lambda k: k != "usage"), _values, max_size=3),
    usage=st.dictionaries(_names, _values, max_size=3),
    indent=st.sampled_from([None, 2]),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=5),
)
def test_splice_nested_property(
    outer: dict[str, Any],
    inner: dict[str, Any],
    usage: dict[str, Any],
    indent: int | None,
    cuts: list[int],
) -> None:
    """A usage object one level down, with decoys (a top-level ``usage``, ``usage`` keys in
    sibling values): only ``response.usage`` gains the fields, however the bytes are cut."""
    doc = {**outer, "usage": {"decoy": 1}, "response": {**inner, "usage": usage}}
    original = json.dumps(doc, indent=indent).encode()
    splicer = UsageSplicer(lambda: FIG, path=RESPONSE_USAGE)
    bounds = sorted({c % (len(original) + 1) for c in cuts} | {0, len(original)})
    out = b"".join(splicer.feed(original[a:b]) for a, b in itertools.pairwise(bounds))
    assert splicer.spliced
    figures = {"energy_j": 12.5, "co2e_g": 0.00123, "source": "measured", "final": False}
    expected = {**doc, "response": {**inner, "usage": {**usage, **figures}}}
    assert json.loads(out) == expected
    added = FIRST if not usage else ADDED
    at = next(i for i in range(len(original)) if out[i] != original[i])
    assert out[:at] + out[at + len(added) :] == original


def test_splice_named_event() -> None:
    """A named event (``event:`` line, then its one ``data:`` line) is spliced in its data."""
    event = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":3}}\n\n'
    assert splice_event(event, lambda: FIG) == event.replace(b"3}", b"3" + ADDED + b"}")
    crlf = event.replace(b"\n", b"\r\n")
    assert splice_event(crlf, lambda: FIG) == crlf.replace(b"3}", b"3" + ADDED + b"}")
    for untouched in (
        b'event: x\ndata: {"usage":{}}\ndata: {"usage":{}}\n\n',  # two data lines
        b'event: x\ndata: {"usage":{}}\nid: 1\n\n',  # a field after the data
        b'event: x\nid: {"usage":{}}\n\n',  # no data line
        b'event: x\ndata: {"usage":{}}',  # unterminated
    ):
        assert splice_event(untouched, lambda: FIG) == untouched


@dataclass(frozen=True)
class NativeStream:
    """One streamed API whose usage is not OpenAI's final chunk: the stand-in, the request,
    the bytes the fields follow in its final usage, and where the client finds them."""

    api: str
    standin: Callable[[], Recorder]
    path: str
    body: dict[str, Any]
    before: bytes
    spot: Callable[[Any], Any]


def _last_event_data(body: bytes, kind: bytes) -> Any:
    for event in body.split(b"\n\n"):
        if kind in event:
            return json.loads(event.split(b"data:", 1)[1])
    raise AssertionError(kind)


def _done_line(body: bytes) -> Any:
    return json.loads(body.rstrip(b"\n").rsplit(b"\n", 1)[-1])


PROMPT_WORDS = "one two three"
NATIVE_STREAMS = {
    "responses": NativeStream(
        "openai",
        OpenAIExtra,
        "/v1/responses",
        {"model": "m", "input": PROMPT_WORDS, "stream": True, "max_output_tokens": 4},
        b'"total_tokens":7',
        lambda body: _last_event_data(body, b"response.completed")["response"]["usage"],
    ),
    "messages": NativeStream(
        "openai",
        OpenAIExtra,
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 4,
            "stream": True,
            "messages": [{"role": "user", "content": PROMPT_WORDS}],
        },
        b'"output_tokens":4',
        lambda body: _last_event_data(body, b"event: message_delta")["usage"],
    ),
    "ollama-generate": NativeStream(
        "ollama",
        lambda: Ollama(default_predict=4),
        "/api/generate",
        {"model": "llama3.2", "prompt": PROMPT_WORDS},
        b'"eval_duration":%d' % (4 * EVAL_NS_PER_TOKEN),
        _done_line,
    ),
    "ollama-chat": NativeStream(
        "ollama",
        lambda: Ollama(default_predict=4),
        "/api/chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT_WORDS}]},
        b'"eval_duration":%d' % (4 * EVAL_NS_PER_TOKEN),
        _done_line,
    ),
    "tgi-generate-stream": NativeStream(
        "tgi",
        TGI,
        "/generate_stream",
        {"inputs": PROMPT_WORDS, "parameters": {"max_new_tokens": 4, "details": True}},
        b'"input_length":4',
        lambda body: json.loads(body.split(b"\n\n")[-2][5:])["details"],
    ),
    "tgi-compat-stream": NativeStream(
        "tgi",
        TGI,
        "/",
        {
            "inputs": PROMPT_WORDS,
            "parameters": {"max_new_tokens": 4, "details": True},
            "stream": True,
        },
        b'"input_length":4',
        lambda body: json.loads(body.split(b"\n\n")[-2][5:])["details"],
    ),
}


async def _standin_bytes(aiohttp_server: Any, case: NativeStream) -> tuple[bytes, str]:
    """What the stand-in itself answers ``case``'s request with, and its content type."""
    standin = case.standin()
    up = await aiohttp_server(standin.app())
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(up) + case.path, json=case.body) as r,
    ):
        assert r.status == 200
        body = await r.read()
    assert body == bytes(standin.sent[-1])
    return body, r.headers["Content-Type"].split(";")[0]


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
@pytest.mark.parametrize("name", list(NATIVE_STREAMS))
async def test_native_stream_parser_splices_final_usage(
    aiohttp_server: Any, name: str, size: int
) -> None:
    """The API's own parser, fed the stand-in's bytes cut anywhere: the fields go in once,
    right after ``before``, and nothing else changes."""
    case = NATIVE_STREAMS[name]
    sent, ctype = await _standin_bytes(aiohttp_server, case)
    assert sent.count(case.before + b"}") == 1
    expected = sent.replace(case.before + b"}", case.before + ADDED + b"}")
    api = for_api(case.api)
    plan = api.plan(case.path, case.body)
    plan.energy = lambda: FIG
    parser = api.stream(case.path, ctype, plan, False)
    assert parser is not None
    out = b"".join(parser.feed(sent[i : i + size]) for i in range(0, len(sent), size))
    assert out + parser.flush() == expected
    assert parser.finish().completion_tokens == 4
    spot = case.spot(expected)
    assert (spot["energy_j"], spot["source"], spot["final"]) == (12.5, "measured", False)
    # not asked for: the parser only watches
    plan.energy = None
    watcher = api.stream(case.path, ctype, plan, False)
    assert watcher is not None
    assert b"".join(watcher.feed(sent[i : i + size]) for i in range(0, len(sent), size)) == sent


@pytest.mark.parametrize("name", list(NATIVE_STREAMS))
async def test_native_stream_through_proxy(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, name: str
) -> None:
    """Through the proxy: off, the stand-in's bytes; asked for by header, the final usage gains
    the four fields and every other byte is the stand-in's."""
    case = NATIVE_STREAMS[name]
    standin = case.standin()
    up = await aiohttp_server(standin.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, case.api))
    base = url_of(proxy)
    got = await call(base, case.path, case.body)
    assert got.body == bytes(standin.sent[-1])
    got = await call(base, case.path, case.body, headers={"X-Wattproxy-Energy": "include"})
    sent = bytes(standin.sent[-1])
    m = _FIELDS.search(got.body)
    assert m is not None, got.body
    assert got.body[: m.start()] + got.body[m.end() :] == sent
    assert got.body[: m.start()].endswith(case.before)
    assert got.body[m.end() : m.end() + 1] == b"}"
    spot = case.spot(got.body)
    assert spot["final"] is False and spot["source"] in ("measured", "estimated")
    assert spot["energy_j"] >= 0 and spot["co2e_g"] >= 0
    assert "x-wattproxy-energy" not in {k.lower() for k in standin.seen[-1].headers}
    assert got.record["completion_tokens"] == 4


async def test_native_stream_without_usage_untouched(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """TGI's stream carries counts only when the client asked for ``details``: without them,
    nothing is added, asked or not."""
    tgi = TGI()
    up = await aiohttp_server(tgi.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "tgi"))
    body = {"inputs": PROMPT_WORDS, "parameters": {"max_new_tokens": 4}}
    got = await call(url_of(proxy), "/generate_stream", body, headers=OPT_IN)
    assert got.body == bytes(tgi.sent[-1])
    assert b'"details":null' in got.body


OPT_IN = {"X-Wattproxy-Energy": "include"}
#: error answers in each streamed format, each holding a final usage: never rewritten
ERROR_STREAMS = {
    "/api/generate": (
        "application/x-ndjson",
        b'{"model":"m","response":"","done":true,"eval_count":3}\n',
    ),
    "/generate_stream": (
        "text/event-stream",
        b'data:{"index":1,"token":{"id":1},"generated_text":"a","details":{"generated_tokens":1}}'
        b"\n\n",
    ),
    "/v1/messages": (
        "text/event-stream",
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":3}}\n\n',
    ),
    "/v1/responses": (
        "text/event-stream",
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"usage":{"input_tokens":1,"output_tokens":3}}}\n\n',
    ),
    "/v1/chat/completions": ("text/event-stream", USAGE + b"data: [DONE]\n\n"),
}


@pytest.mark.parametrize(
    ("api", "path"),
    [
        ("ollama", "/api/generate"),
        ("tgi", "/generate_stream"),
        ("openai", "/v1/messages"),
        ("openai", "/v1/responses"),
        ("openai", "/v1/chat/completions"),
    ],
)
async def test_error_stream_untouched(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, api: str, path: str
) -> None:
    ctype, sent = ERROR_STREAMS[path]

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=503, headers={"Content-Type": ctype})
        await resp.prepare(request)
        await resp.write(sent)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post(path, answer)
    up = await aiohttp_server(app)
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, api))
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
        "inputs": "hi",
        "parameters": {"details": True},
    }
    got = await call(url_of(proxy), path, body, headers=OPT_IN)
    assert got.status == 503
    assert got.body == sent


NATIVE_BODIES = {
    "ollama-generate": NativeStream(
        "ollama",
        lambda: Ollama(default_predict=4),
        "/api/generate",
        {"model": "llama3.2", "prompt": PROMPT_WORDS, "stream": False},
        b'"eval_duration":%d' % (4 * EVAL_NS_PER_TOKEN),
        json.loads,
    ),
    "ollama-chat": NativeStream(
        "ollama",
        lambda: Ollama(default_predict=4),
        "/api/chat",
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": PROMPT_WORDS}],
            "stream": False,
        },
        b'"eval_duration":%d' % (4 * EVAL_NS_PER_TOKEN),
        json.loads,
    ),
    "ollama-embed": NativeStream(
        "ollama",
        Ollama,
        "/api/embed",
        {"model": "all-minilm", "input": PROMPT_WORDS},
        b'"prompt_eval_count":3',
        json.loads,
    ),
    "tgi-generate": NativeStream(
        "tgi",
        TGI,
        "/generate",
        {"inputs": PROMPT_WORDS, "parameters": {"max_new_tokens": 4, "details": True}},
        b'"special":false}]',
        lambda body: json.loads(body)["details"],
    ),
}


@pytest.mark.parametrize("name", list(NATIVE_BODIES))
async def test_native_body_through_proxy(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, name: str
) -> None:
    """Non-streamed native answers: Ollama's counts are top-level members, so are the figures;
    TGI's are in ``details``. Every other byte is the stand-in's."""
    case = NATIVE_BODIES[name]
    standin = case.standin()
    up = await aiohttp_server(standin.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, case.api))
    base = url_of(proxy)
    got = await call(base, case.path, case.body)
    assert got.body == bytes(standin.sent[-1])
    assert got.headers["Content-Length"] == str(len(got.body))
    got = await call(base, case.path, case.body, headers=OPT_IN)
    sent = bytes(standin.sent[-1])
    m = _FIELDS.search(got.body)
    assert m is not None, got.body
    assert got.body[: m.start()] + got.body[m.end() :] == sent
    assert got.body[: m.start()].endswith(case.before)
    assert got.body[m.end() : m.end() + 1] == b"}"
    spot = case.spot(got.body)
    assert spot["final"] is False and spot["source"] in ("measured", "estimated")
    assert "Content-Length" not in got.headers
    assert float(got.headers["X-Wattproxy-Energy-Estimate-J"]) > 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # no details asked for: no counts, no figures
        ("/generate", {"inputs": PROMPT_WORDS, "parameters": {"max_new_tokens": 4}}),
        # TGI's "/" answers a list: nothing is spliced into a list
        (
            "/",
            {"inputs": PROMPT_WORDS, "parameters": {"max_new_tokens": 4, "details": True}},
        ),
    ],
)
async def test_native_body_without_usage_object_untouched(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, path: str, body: Any
) -> None:
    tgi = TGI()
    up = await aiohttp_server(tgi.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "tgi"))
    got = await call(url_of(proxy), path, body, headers=OPT_IN)
    assert got.body == bytes(tgi.sent[-1])


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_measured_figures_in_a_streams_usage(
    aiohttp_server: Any, tmp_path: Path, workers: int
) -> None:
    """A metered stream that lasts several meter intervals gets the energy measured so far
    (``source: "measured"``, ``final: false``) in its usage chunk, also with two workers (the
    accounting process sends the figures back to the worker at every interval); its record's
    final energy is at least that."""
    up = await aiohttp_server(StandIn(flavor="vllm", scale=3.0).app())  # ~36 ms per token
    doc = base_config(url_of(up), tmp_path)
    doc["listen"]["workers"] = workers
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        body, headers = await _chat(s, served.base, {**STREAM_USAGE, "max_tokens": 12}, True)
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
        usage = json.loads(events[-1][6:])["usage"]
        assert usage["completion_tokens"] == 12
        assert usage["source"] == "measured" and usage["final"] is False
        assert usage["energy_j"] > 0 and usage["co2e_g"] > 0
        record = await final_record(s, served.base, headers["X-Request-Id"])
    assert record["energy_j"] >= usage["energy_j"]
