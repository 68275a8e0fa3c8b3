"""wattproxy in front of the OpenAI-compatible routes beyond chat: Responses, Anthropic Messages,
images, audio (a multi-MB multipart upload streamed through, a WAV answer), rerank and score."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.standins.openai_extra import SPEECH_S_PER_WORD, OpenAIExtra, wav_bytes
from proxy.usage.audio import WavProbe
from proxy.usage.base import MAX_EVENT_BYTES
from proxy.usage.multipart import MultipartUpload, boundary_of, upload_probe
from proxy.usage.openai import EventSSE, plan_openai_request, usage_from_body
from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config
from tests.helpers.tiny_model import build_tokenizer, pieces

PROMPT = "why is the sky blue"  # 5 words


async def start(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    extra: OpenAIExtra,
    **upstream: Any,
) -> str:
    up = await aiohttp_server(extra.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "openai", **upstream))
    return url_of(proxy)


# -- /v1/responses and /v1/messages --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "unasked", "streamed"),
    [
        ("/v1/responses", {"model": "m", "input": PROMPT, "max_output_tokens": 4}, False, False),
        (
            "/v1/responses",
            {"model": "m", "input": PROMPT, "max_output_tokens": 4, "stream": True},
            False,
            True,
        ),
        ("/v1/responses", {"model": "m", "input": PROMPT, "max_output_tokens": 4}, True, True),
        (
            "/v1/messages",
            {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": PROMPT}]},
            False,
            False,
        ),
        (
            "/v1/messages",
            {
                "model": "m",
                "max_tokens": 4,
                "stream": True,
                "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
            },
            False,
            True,
        ),
    ],
)
async def test_responses_and_messages(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    path: str,
    body: dict[str, Any],
    unasked: bool,
    streamed: bool,
) -> None:
    extra = OpenAIExtra(stream_unasked=unasked)
    base = await start(aiohttp_server, make_proxy, tmp_path, extra)
    got = await call(base, path, body)
    assert got.status == 200
    assert got.body == bytes(extra.sent[-1])
    assert json.loads(extra.seen[-1].body) == body  # nothing injected into these APIs
    assert got.headers["Content-Type"].startswith(
        "text/event-stream" if streamed else "application/json"
    )
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (5, 4)
    assert rec["tokens_source"] == "server"
    assert rec["task"] == "text-generation"


# -- images, rerank, score -------------------------------------------------------------------------


async def test_images_count_size_and_steps(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    extra = OpenAIExtra()
    base = await start(aiohttp_server, make_proxy, tmp_path, extra)
    body = {
        "model": "sd",
        "prompt": "a red fox",
        "n": 3,
        "size": "512x512",
        "num_inference_steps": 30,
    }
    got = await call(base, "/v1/images/generations", body)
    assert got.body == bytes(extra.sent[-1])
    rec = got.record
    assert rec["task"] == "text-to-image"
    assert (rec["images"], rec["image_size"], rec["steps"]) == (3, "512x512", 30)
    assert rec["completion_tokens"] is None  # no text generated, nothing invented


def test_an_image_size_in_other_digits_is_not_recorded() -> None:
    plan = plan_openai_request("/v1/images/generations", {"size": "\u0665\u0661\u0662x512"})
    assert "image_size" not in plan.extra


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
async def test_rerank_total_tokens(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, path: str
) -> None:
    extra = OpenAIExtra()
    base = await start(aiohttp_server, make_proxy, tmp_path, extra)
    body = {"model": "bge-reranker", "query": "a b", "documents": ["c", {"text": "d e f"}]}
    got = await call(base, path, body)
    assert got.body == bytes(extra.sent[-1])
    assert got.record["task"] == "text-ranking"
    assert (got.record["prompt_tokens"], got.record["completion_tokens"]) == (6 + 8, 0)
    assert got.record["tokens_source"] == "server"


async def test_score(aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path) -> None:
    extra = OpenAIExtra()
    base = await start(aiohttp_server, make_proxy, tmp_path, extra)
    got = await call(base, "/v1/score", {"model": "m", "text_1": "a", "text_2": ["b c", "d"]})
    assert got.body == bytes(extra.sent[-1])
    assert (got.record["task"], got.record["prompt_tokens"]) == ("text-ranking", 6 + 5)


# -- audio ---------------------------------------------------------------------------------------

BOUNDARY = "wattproxy-test-7d1f3a9c"
SECONDS = 30.0


def multipart(audio: bytes, filename: str = "speech.wav") -> bytes:
    def field(name: str, value: str) -> bytes:
        return (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()

    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    return (
        field("model", "whisper-large-v3")
        + head
        + audio
        + b"\r\n"
        + field("language", "en")
        + f"--{BOUNDARY}--\r\n".encode()
    )


async def test_multipart_upload_streams_through_unchanged_and_is_timed(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    extra = OpenAIExtra(progress_at=1 << 20)
    base = await start(aiohttp_server, make_proxy, tmp_path, extra)
    audio = wav_bytes(SECONDS, rate=44_100, channels=2)  # 5.3 MB
    body = multipart(audio)
    assert len(body) > 5_000_000
    half = len(body) // 2

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, half, 65536):
            yield body[i : min(i + 65536, half)]
        # the upstream has the first megabyte before the client sends the second half:
        # a proxy that held the upload whole would never get here
        await asyncio.wait_for(extra.progress.wait(), timeout=10)
        for i in range(half, len(body), 65536):
            yield body[i : i + 65536]

    got = await call(
        base,
        "/v1/audio/transcriptions",
        data=chunks(),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert got.status == 200
    assert got.body == bytes(extra.sent[-1])
    upload = extra.uploads[-1]
    assert upload.size == len(audio)
    assert upload.sha256 == hashlib.sha256(audio).hexdigest()  # byte-identical upload
    assert upload.fields == {"model": "whisper-large-v3", "language": "en"}
    assert upload.wav_seconds == pytest.approx(SECONDS)
    rec = got.record
    assert rec["task"] == "automatic-speech-recognition"
    assert rec["model"] == "whisper-large-v3"  # from the multipart form field
    assert rec["audio_s"] == pytest.approx(SECONDS)  # from the RIFF header, not the server
    assert rec["completion_tokens"] == 5  # "the quick brown fox": 19 bytes / 4, estimated
    assert rec["tokens_source"] == "estimate"


async def test_transcription_text_answer_with_tokenizer(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    model = build_tokenizer(tmp_path / "tok")
    extra = OpenAIExtra()
    base = await start(aiohttp_server, make_proxy, tmp_path, extra, model_path=str(model))
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("model", "whisper")
    form.add_field("response_format", "text")
    form.add_field("file", wav_bytes(2.5, rate=16_000), filename="a.wav", content_type="audio/wav")
    got = await call(base, "/v1/audio/transcriptions", data=form)
    assert got.body == b"the quick brown fox\n"
    assert got.record["audio_s"] == pytest.approx(2.5)
    assert got.record["model"] == "whisper"
    assert got.record["completion_tokens"] is None  # a text/plain answer is not parsed


@pytest.mark.parametrize("sized", [True, False])
async def test_speech_wav_answer_is_timed(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, sized: bool
) -> None:
    extra = OpenAIExtra(sized_wav=sized)
    base = await start(aiohttp_server, make_proxy, tmp_path, extra)
    text = "one two three four five six seven eight"
    got = await call(
        base,
        "/v1/audio/speech",
        {"model": "tts", "input": text, "voice": "a", "response_format": "wav"},
    )
    assert got.body == bytes(extra.sent[-1])
    assert got.headers["Content-Type"] == "audio/wav"
    rec = got.record
    assert rec["task"] == "text-to-speech"
    assert rec["audio_s"] == pytest.approx(8 * SPEECH_S_PER_WORD)
    assert rec["prompt_tokens"] == 10  # 39 bytes of input / 4, estimated


# -- the parsers alone ---------------------------------------------------------------------------


def test_wav_probe_any_split_and_truncation() -> None:
    audio = wav_bytes(1.5, rate=8000)
    for step in (1, 3, 44, 45, 1000):
        probe = WavProbe()
        for i in range(0, len(audio), step):
            probe.feed(audio[i : i + step])
        assert probe.duration_s == pytest.approx(1.5)
    probe = WavProbe()
    probe.feed(audio[: 44 + 8000])  # broken off after half a second
    assert probe.duration_s == pytest.approx(0.5)
    probe = WavProbe()
    probe.feed(b"ID3\x04" + b"\0" * 100)  # an mp3
    assert probe.failed and probe.duration_s is None


def test_multipart_probe_memory_is_bounded() -> None:
    audio = wav_bytes(SECONDS, rate=16_000)
    body = multipart(audio)
    for step in (1, 7, 4096, 65536):
        probe = upload_probe(f'multipart/form-data; boundary="{BOUNDARY}"')
        assert isinstance(probe, MultipartUpload)
        limit = len(body) if step >= 4096 else 200_000  # byte by byte: a prefix is enough
        for i in range(0, limit, step):
            probe.feed(body[i : i + step])
        assert probe.max_buffered < step + 200  # a chunk and a delimiter, never the upload
        if limit == len(body):
            assert probe.audio_s == pytest.approx(SECONDS)
            assert probe.fields == {"model": "whisper-large-v3", "language": "en"}
            assert probe.files == 1


def test_boundary_parsing() -> None:
    assert boundary_of("multipart/form-data; boundary=abc") == b"abc"
    assert boundary_of('Multipart/Form-Data; charset=x; boundary="a b"') == b"a b"
    assert boundary_of("application/octet-stream") is None
    assert upload_probe("multipart/form-data") is None


RESPONSES_STREAM = (
    b'event: response.created\ndata: {"type":"response.created","response":{"usage":null}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":"Hi"}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":" there"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{"output":[],'
    b'"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},'
    b'"output_tokens":2,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":13}}}\n\n'
)


@pytest.mark.parametrize("step", [1, 5, 64, 100_000])
def test_event_sse_parser(step: int) -> None:
    parser = EventSSE(collect_text=True)
    data = RESPONSES_STREAM
    out = b"".join(parser.feed(data[i : i + step]) for i in range(0, len(data), step))
    assert out + parser.flush() == data
    usage = parser.finish()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.tokens_source) == (11, 2, "server")
    assert parser.tokens == 2
    assert parser.text == "Hi there"


def test_event_sse_oversize_completed_event_still_counts() -> None:
    text = "x" * (MAX_EVENT_BYTES + 100)
    big = (
        b'event: response.completed\ndata: {"type":"response.completed","response":{"output":"'
        + text.encode()
        + b'","usage":{"input_tokens":3,"output_tokens":9}}}\n\n'
    )
    parser = EventSSE()
    for i in range(0, len(big), 65536):
        parser.feed(big[i : i + 65536])
    parser.flush()
    usage = parser.finish()
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 9)


def test_messages_start_alone_is_not_a_final_count() -> None:
    start = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"x",'
        b'"usage":{"input_tokens":7,"output_tokens":0}}}\n\n'
    )
    delta = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta",'
        b'"delta":{"type":"text_delta","text":"a"},"index":0}\n\n'
    )
    parser = EventSSE()
    parser.feed(start + delta + delta)  # the stream broke before message_delta
    usage = parser.finish()
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 2)


def test_plans_and_bodies_of_the_extra_routes() -> None:
    plan = plan_openai_request(
        "/v1/responses",
        {
            "model": "m",
            "instructions": "be brief",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            "max_output_tokens": 9,
        },
    )
    assert plan.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert (plan.prompt_text, plan.max_tokens, plan.inject_usage) == ("be brief\nhi", 9, False)
    plan = plan_openai_request(
        "/v1/messages",
        {
            "model": "m",
            "system": "s",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "u"}],
        },
    )
    assert plan.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    plan = plan_openai_request("/v1/rerank", {"query": "q", "documents": ["a", {"text": "b"}]})
    assert plan.prompt_parts == ["q", "a", "q", "b"]
    u = usage_from_body(
        "/v1/audio/transcriptions", {"text": "hi", "usage": {"type": "duration", "seconds": 4}}
    )
    assert (u.audio_s, u.generated_text, u.completion_tokens) == (4.0, "hi", None)
    u = usage_from_body("/v1/chat/completions", {"choices": [{"message": {"content": "a b"}}]})
    assert (u.completion_tokens, u.generated_text) == (None, "a b")
    assert pieces("a b") == 2


def test_collected_text_decodes_escapes_without_decoding_events() -> None:
    parser = EventSSE(collect_text=True)
    parser.feed(
        b'data: {"type":"response.output_text.delta","delta":"caf\\u00e9 \\"q\\"\\n"}\n\n'
        b'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"!"}}\n\n'
    )
    assert parser.text == 'café "q"\n!'
    assert parser.tokens == 2
