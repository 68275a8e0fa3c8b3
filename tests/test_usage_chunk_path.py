"""The chunk-level SSE path of ``OpenAISSE`` changes nothing but its cost: real servers' streams
(byte-exact replays, and the stand-ins' streams read over loopback HTTP), cut at any byte and
grouped into chunks of any number of events, give the client the same bytes after every chunk,
the same token count after every chunk, and the same usage, text and end as the parser held to
the per-event path (``chunk_path=False``). So do the same streams damaged in the places the
chunk path has to notice: usage, timings, empty texts, role announcements, ``[DONE]``, stray
quotes, newlines and carriage returns."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.sse_parser import vllm_stream as bench_vllm_stream
from proxy.standins import StandIn
from proxy.standins.llamacpp import LLAMA_CPP_PYTHON, llama_server_stream
from proxy.standins.tgi import TGI
from proxy.usage.base import Usage
from proxy.usage.openai import OpenAISSE
from tests.helpers.openai_replays import (
    LLAMACPP,
    ROLE,
    TRANSFORMERS,
    TRANSFORMERS_5_24,
    TRANSFORMERS_5_25,
    TRANSFORMERS_5_25_USAGE,
    USAGE,
    VLLM_CLIENT_VIEW,
    VLLM_WITH_USAGE,
    chunk,
)
from tests.helpers.vllm_streams import vllm_stream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
COMPLETION = {"model": "m", "prompt": "one two three", "stream": True}
ASK_USAGE = {"stream_options": {"include_usage": True}}

#: Byte-exact replays kept in the tests and the benchmark.
REPLAYS: dict[str, bytes] = {
    "vllm, usage asked by the proxy": VLLM_WITH_USAGE,
    "vllm, no usage": VLLM_CLIENT_VIEW,
    "vllm, usage null on every chunk": ROLE.replace(b"]}\n\n", b'],"usage":null}\n\n') * 3
    + USAGE
    + b"data: [DONE]\n\n",
    "llama.cpp, usage on the finish chunk": LLAMACPP,
    "transformers serve": TRANSFORMERS,
    "transformers serve 5.24": TRANSFORMERS_5_24,
    "transformers serve 5.25": TRANSFORMERS_5_25,
    "transformers serve 5.25, usage asked": TRANSFORMERS_5_25_USAGE,
    "llama-cpp-python": LLAMA_CPP_PYTHON,
    "llama.cpp server": llama_server_stream(False),
    "llama.cpp server, usage asked": llama_server_stream(True),
    "benchmark vllm stream": b"".join(bench_vllm_stream(40)),
    # llama.cpp's timings_per_token: cumulative timings on every content chunk
    "llama.cpp, timings on every chunk": b"".join(
        chunk(text, extra=f',"timings":{{"cache_n":2,"prompt_n":5,"predicted_n":{n}}}')
        for n, text in enumerate(["a", " b", " c"], start=1)
    ),
    **{
        f"vllm 0.10, include_usage={inc}, continuous_usage_stats={cont}": vllm_stream(inc, cont)
        for inc in (False, True)
        for cont in (False, True)
    },
}


async def _read_stream(app: web.Application, path: str, body: dict[str, Any]) -> bytes:
    """What ``app`` answers to one streamed request, over a real loopback socket."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}{path}", json=body) as resp,
        ):
            assert resp.status == 200, await resp.text()
            return await resp.read()
    finally:
        await runner.cleanup()


#: Streams of the stand-ins (``proxy/standins/``, TGI's Messages API in
#: ``proxy/standins/tgi.py``), named: server, route, whether usage was asked for.
LIVE = {
    **{
        f"stand-in {flavor}, {path}, usage={ask}": (flavor, path, ask)
        for flavor in ("vllm", "llamacpp", "transformers")
        for path in ("/v1/chat/completions", "/v1/completions")
        for ask in (False, True)
    },
    **{
        f"tgi, {path}, usage={ask}, eos={eos}": ("tgi" if eos else "tgi-no-eos", path, ask)
        for path in ("/v1/chat/completions", "/v1/completions")
        for ask in (False, True)
        for eos in (False, True)
    },
}


@functools.cache
def stream_of(name: str) -> bytes:
    if name in REPLAYS:
        return REPLAYS[name]
    flavor, path, ask = LIVE[name]
    if flavor.startswith("tgi"):
        app = TGI(eos_after=3 if flavor == "tgi" else None).app()
    else:
        app = StandIn(flavor=flavor, scale=0.0).app()
    body = {**(CHAT if path.endswith("/chat/completions") else COMPLETION), "max_tokens": 5}
    return asyncio.run(_read_stream(app, path, {**body, **(ASK_USAGE if ask else {})}))


NAMES = sorted([*REPLAYS, *LIVE])
#: (strip_usage, strip_nulls, collect_text): as the proxy builds parsers (TGI keeps its nulls)
MODES = [(s, n, c) for s in (False, True) for n in (False, True) for c in (False, True)]


def event_ends(stream: bytes) -> list[int]:
    return [m.end() for m in re.finditer(rb"\r\n\r\n|\n\n|\r\r", stream)]


def pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


Observed = tuple[list[tuple[bytes, int]], bytes, Usage, str, bool, int]


def observe(
    stream: bytes, cuts: list[int], stop: int, mode: tuple[bool, bool, bool], chunk_path: bool
) -> Observed:
    """Everything the proxy reads from a parser: after each chunk what goes to the client and
    the token count; at the end (after ``stop`` chunks: a client that went away early) the
    held-back rest, the usage, the text, ``[DONE]``."""
    strip, nulls, collect = mode
    parser = OpenAISSE(strip, collect, nulls, chunk_path=chunk_path)
    steps = [(parser.feed(c), parser.tokens) for c in pieces(stream, cuts)[:stop]]
    tail = parser.flush()
    return steps, tail, parser.finish(), parser.text, parser.done, parser.events


@st.composite
def cut_points(draw: st.DrawFn, stream: bytes) -> list[int]:
    """Chunks of whole events (one each, as servers write them, or any grouping), cut at line
    starts and anywhere as well."""
    ends = event_ends(stream)
    if draw(st.booleans()):
        return ends
    lines = [m.start() for m in re.finditer(rb"(?<=\n)[^\n]|data:", stream)]
    at_events = draw(st.lists(st.sampled_from(ends), unique=True)) if ends else []
    at_lines = draw(st.lists(st.sampled_from(lines), max_size=3)) if lines else []
    anywhere = draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4))
    return at_events + at_lines + anywhere


def assert_same(data: st.DataObject, stream: bytes, mode: tuple[bool, bool, bool]) -> None:
    cuts = data.draw(cut_points(stream))
    stop = data.draw(st.sampled_from([len(stream), 0, 1, 2, 3, 5, 8]))
    fast = observe(stream, cuts, stop, mode, chunk_path=True)
    slow = observe(stream, cuts, stop, mode, chunk_path=False)
    assert fast == slow


@settings(max_examples=400, deadline=None)
@given(data=st.data(), name=st.sampled_from(NAMES), mode=st.sampled_from(MODES))
def test_chunk_path_matches_the_per_event_path_on_real_streams(
    data: st.DataObject, name: str, mode: tuple[bool, bool, bool]
) -> None:
    stream = stream_of(name)
    crlf = data.draw(st.booleans())
    if crlf:
        stream = stream.replace(b"\n\n", b"\r\n\r\n")
    assert_same(data, stream, mode)


#: What the chunk path must notice, put where it hurts: in place of a text, or anywhere.
TEXTS = [
    b"",
    b"usage",
    b"timings",
    b"[DONE]",
    b'\\"',
    b'\\"usage\\":null',
    b'"',
    b"a\nb",
    b"a\n\nb",
    b"\r",
    b" x",
    b"\\u00e9",
    b"a\n\ndata: [DONE]\n\n",
    b"a\r\rdata: [DONE]\r\r",
    b"\rx",
]
INSERTS = [
    b'"',
    b"\n",
    b"\n\n",
    b"\r",
    b'""',
    b" ",
    b"data: ",
    b"data:[DONE]\n\n",
    b": keep-alive\n\n",
    b'"usage":null,',
    b'"usage": null,',
    b'"usage":{"prompt_tokens":3,"completion_tokens":2},',
    b'"timings":{"prompt_n":3,"predicted_n":2},',
    b'"content":"',
    b'"content":"",',
    b'"text":"x",',
    b'"role":"assistant",',
    b'"finish_reason":"stop",',
    b"usage",
    b': "content":"x"\n\n',  # no data: no event, whatever it holds
    b'id: 1 "text":"y"\n\n',
    b"\ndata: ",
]
#: Put at the start of an event's object, where a key counts.
KEYS = [
    b'"usage":null,',
    b'"usage":{"prompt_tokens":3,"completion_tokens":2},',
    b'"usage":null,"usage":{"prompt_tokens":3,"completion_tokens":2},',
    b'"timings":{"prompt_n":3,"predicted_n":2},',
    b'"role":"assistant",',
    b'"r":1,\r',  # a line ends here for the per-event path
]
#: Keys the per-event path reads only once the bytes name them: a text "usage" or "timings"
#: between quotes does (JSON decodes the escaped key as the same name).
HOSTILE = [
    b'data: {"\\u0075sage":{"prompt_tokens":4,"completion_tokens":9},'
    b'"choices":[{"delta":{"content":"' + text + b'"}}]}\n\n'
    for text in (b"a", b"b", b"usage", b"c")
] + [
    b'data: {"\\u0074imings":{"prompt_n":4,"predicted_n":9},'
    b'"choices":[{"delta":{"content":"' + text + b'"}}]}\n\n'
    for text in (b"a", b"timings", b"b")
]
_TEXT = re.compile(rb'("(?:content|text)"\s*:\s*")((?:[^"\\\n]|\\.)*)"')


_OBJECT = re.compile(rb"data: ?\{")


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        stream = b"".join(draw(st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=8)))
    else:
        stream = stream_of(draw(st.sampled_from(NAMES)))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["text", "key", "between", "anywhere"]))
        spots = list((_TEXT if how == "text" else _OBJECT).finditer(stream))
        ends = event_ends(stream)
        if how == "text" and spots:
            m = draw(st.sampled_from(spots))
            stream = stream[: m.start(2)] + draw(st.sampled_from(TEXTS)) + stream[m.end(2) :]
        elif how == "key" and spots:
            at = draw(st.sampled_from(spots)).end()
            stream = stream[:at] + draw(st.sampled_from(KEYS)) + stream[at:]
        elif how == "between" and ends:
            at = draw(st.sampled_from(ends))
            stream = stream[:at] + draw(st.sampled_from(INSERTS)) + stream[at:]
        else:
            at = draw(st.integers(0, len(stream)))
            stream = stream[:at] + draw(st.sampled_from(INSERTS)) + stream[at:]
    return stream


@settings(max_examples=600, deadline=None)
@given(data=st.data(), stream=damaged(), mode=st.sampled_from(MODES))
def test_chunk_path_matches_the_per_event_path_on_damaged_streams(
    data: st.DataObject, stream: bytes, mode: tuple[bool, bool, bool]
) -> None:
    assert_same(data, stream, mode)


def _event(body: str) -> bytes:
    return f"data: {{{body}}}\n\n".encode()


TGI_LIKE = '"choices":[{{"delta":{{"role":"assistant","content":"{}"}}}}]'
ESCAPED_USAGE = (
    '"\\u0075sage":{{"prompt_tokens":4,"completion_tokens":9}},'
    '"choices":[{{"delta":{{"content":"{}"}}}}]'
)
ESCAPED_TIMINGS = '"\\u0074imings":{{"prompt_n":4,"predicted_n":9}},"choices":[{{"text":"{}"}}]'


@pytest.mark.parametrize(
    ("chunks"),
    [
        # the bytes around the text stay, the text makes a key the per-event path then decodes
        [_event(ESCAPED_USAGE.format("a")), _event(ESCAPED_USAGE.format("usage"))],
        [_event(ESCAPED_TIMINGS.format("a")), _event(ESCAPED_TIMINGS.format("timings"))],
        # ... or an empty text beside a role (no token), or a new event
        [_event(TGI_LIKE.format("a")), _event(TGI_LIKE.format('"'))],
        [_event(TGI_LIKE.format("a")), _event(TGI_LIKE.format("b\n\ndata: [DONE]\n\nc"))],
        [_event(TGI_LIKE.format("a")), _event(TGI_LIKE.format("b\r\rdata: [DONE]\r\rc"))],
        # a carriage return ends the line before the text
        [b'data: {"r":1\r"choices":[{"delta":{"content":"a"}}]}\n\n'],
        [_event(TGI_LIKE.format("a")) + b'data: {"r":1\r"choices":[{"text":"a"}]}\n\n'],
        # an event without data, holding a text
        [_event(TGI_LIKE.format("a")) + b': "content":"x"\n\n'],
        # a chunk that starts a line of an event begun in the chunk before
        [b'data: {"choices":\n', b'data: [{"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n"],
    ],
)
def test_what_the_chunk_path_must_not_take(chunks: list[bytes]) -> None:
    stream = b"".join(chunks)
    cuts = list(itertools.accumulate(len(c) for c in chunks))
    for mode in MODES:
        fast = observe(stream, cuts, len(chunks), mode, chunk_path=True)
        assert fast == observe(stream, cuts, len(chunks), mode, chunk_path=False)


def test_content_chunks_take_the_chunk_path() -> None:
    """The chunk path is taken where it can be (else the test above proves nothing): every
    plain content event of vLLM, llama.cpp's server and TGI, alone or in groups; never the
    role, finish, usage or ``[DONE]`` events, nor anything while text is collected."""
    for name, want in [
        ("benchmark vllm stream", 40),
        ("llama.cpp server", 3),
        ("tgi, /v1/chat/completions, usage=True, eos=False", 5),
        ("stand-in vllm, /v1/completions, usage=True", 5),  # the last with "length": a token
    ]:
        events = [e + b"\n\n" for e in stream_of(name).split(b"\n\n")[:-1]]
        for strip in (False, True):
            parser = OpenAISSE(strip_usage=strip, strip_nulls=not name.startswith("tgi"))
            taken = [parser._count_whole_events(e) for e in events]
            # with usage injected, an event that finishes waits for the next (llama-server's
            # timings may have to go back into it): the per-event path holds it
            plain = OpenAISSE(strip_nulls=not name.startswith("tgi"))
            finishing = sum(
                1
                for e in events
                if plain._count_whole_events(e) and re.search(rb'"finish_reason"\s*:\s*"', e)
            )
            assert sum(taken) == (want - finishing if strip else want), (name, taken)
            parser = OpenAISSE(strip_usage=strip, strip_nulls=not name.startswith("tgi"))
            content = [e for e, t in zip(events, taken, strict=True) if t]
            assert parser._count_whole_events(b"".join(content)) == (len(content) > 0)
            assert parser.tokens == len(content)
            # collecting text needs every event decoded: the per-event path collects it
            collecting = OpenAISSE(strip_usage=strip, collect_text=True)
            collecting.feed(b"".join(content))
            assert collecting.tokens == len(content)
            assert collecting.text == "".join(text_of(e) for e in content)


def text_of(event: bytes) -> str:
    choice = json.loads(event[5:])["choices"][0]
    return str(choice["delta"]["content"] if "delta" in choice else choice["text"])


@pytest.mark.parametrize(
    "chunk",
    [
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data:{"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n',
        b'data: {"choices":[{"text":" x"}]}\n\ndata: {"choices":[{"text":"y"}]}\n\n',
    ],
)
def test_plain_chunks_are_counted_whole(chunk: bytes) -> None:
    parser = OpenAISSE(strip_usage=True, strip_nulls=False)
    assert parser._count_whole_events(chunk)
    assert parser.tokens == chunk.count(b"\n\n")


@pytest.mark.parametrize(
    "chunk",
    [
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n',  # not a whole event
        b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n',
        b'data: {"choices":[{"delta":{"content":""}}]}\n\n',  # empty: a held-back token
        b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n',  # no token
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\n',
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n: ping\n\n',
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n\n\n',
        b'event: x\ndata: {"choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":1}}\n\n',
        b'data: {"choices":[{"delta":{"content":"a"}}],"timings":{"predicted_n":1}}\n\n',
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null,"usage":null}\n\n'
        b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
    ],
)
def test_doubtful_chunks_take_the_per_event_path(chunk: bytes) -> None:
    parser = OpenAISSE(strip_usage=False)
    assert not parser._count_whole_events(chunk)
    assert (parser.tokens, parser.events) == (0, 0)


def test_injected_usage_nulls_are_still_stripped() -> None:
    """With ``strip_nulls`` the ``"usage":null`` the proxy caused must go: per-event path."""
    chunk = json.dumps({"choices": [{"delta": {"content": "a"}}], "usage": None})
    event = f"data: {chunk}\n\n".encode()
    parser = OpenAISSE(strip_usage=True)
    assert not parser._count_whole_events(event)
    assert parser.feed(event) == b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
