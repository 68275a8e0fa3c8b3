"""Pure HTTP-side rules: routing, task mapping, header filtering, request targets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.config import UpstreamConfig
from proxy.errors import BadRequest
from proxy.headers import client_request_id, filter_headers, request_id
from proxy.routing import Router
from proxy.target import check_target
from proxy.tasks import OTHER, task_for

UPSTREAMS = [
    UpstreamConfig(name="default", url="http://a:1", prefix="/"),
    UpstreamConfig(name="llama", url="http://b:1", prefix="/v1", models=["llama-*"]),
    UpstreamConfig(name="embed", url="http://c:1", prefix="/v1", models=["bge-small"]),
    UpstreamConfig(name="ollama", url="http://d:1", prefix="/api", api="ollama"),
]


@pytest.mark.parametrize(
    ("path", "model", "expected"),
    [
        ("/v1/chat/completions", "llama-3-8b", "llama"),
        ("/v1/embeddings", "bge-small", "embed"),
        ("/v1/embeddings", "bge-large", None),  # prefix matched, no model does
        ("/v1/chat/completions", None, "llama"),  # no model: first candidate
        ("/api/chat", "anything", "ollama"),
        ("/apix/chat", None, "default"),  # /api must match a whole segment
        ("/health", None, "default"),
        ("/v1", None, "llama"),
    ],
)
def test_routing(path: str, model: str | None, expected: str | None) -> None:
    route = Router(UPSTREAMS).route(path, model)
    assert (route.name if route else None) == expected


def test_needs_model() -> None:
    router = Router(UPSTREAMS)
    assert router.needs_model("/v1/chat/completions")
    assert not router.needs_model("/api/chat")


@pytest.mark.parametrize(
    ("path", "overrides", "api", "task"),
    [
        ("/v1/chat/completions", {}, "openai", "text-generation"),
        ("/v1/embeddings", {}, "openai", "feature-extraction"),
        ("/v1/images/generations", {}, "openai", "text-to-image"),
        ("/v1/audio/transcriptions", {}, "openai", "automatic-speech-recognition"),
        ("/v1/completions", {"/v1/completions": "summarization"}, "openai", "summarization"),
        ("/v1/models", {}, "openai", OTHER),
        ("/", {}, "openai", OTHER),
        ("/", {}, "tgi", "text-generation"),
        ("/api/chat", {}, "ollama", "text-generation"),
    ],
)
def test_task_for(path: str, overrides: dict[str, str], api: str, task: str) -> None:
    assert task_for(path, overrides, api) == task


def test_filter_headers_drops_hop_by_hop_and_connection_named() -> None:
    h = CIMultiDict(
        [
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("X-Keep", "a"),
            ("X-Keep", "b"),
            ("Host", "h"),
        ]
    )
    out = filter_headers(h, {"host"})
    assert list(out.items()) == [("X-Keep", "a"), ("X-Keep", "b")]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123_x.y:z", True),
        ("", False),
        ("has space", False),
        ("x" * 129, False),
        ("ü", False),
        (None, False),
    ],
)
def test_request_id(given: str | None, kept: bool) -> None:
    plain = client_request_id(given)
    assert plain == (given if kept else None)
    # the key: the client's plain id only when trusted and not in flight, else a fresh one
    trusted = request_id(plain, trust=True)
    assert (trusted == given) is kept
    fresh = [
        request_id(plain, trust=False),
        request_id(plain, trust=True, in_flight=lambda rid: True),
    ]
    if not kept:
        fresh.append(trusted)
    for rid in fresh:
        assert rid != given and len(rid) == 32 and int(rid, 16) >= 0


@pytest.mark.parametrize(
    ("method", "raw", "path"),
    [
        ("CONNECT", "example.com:443", "example.com:443"),
        ("GET", "http://evil.example/x", "/x"),
        ("GET", "//evil.example/x", "//evil.example/x"),
        ("GET", "/v1/..%2f..%2fetc", "/v1/../../etc"),
        ("GET", "/v1/../admin", "/v1/../admin"),
        ("GET", "/v1/%2e%2e/admin", "/v1/../admin"),
        ("GET", "/v1/a%2Fb", "/v1/a/b"),
    ],
)
def test_check_target_refuses(method: str, raw: str, path: str) -> None:
    with pytest.raises(BadRequest):
        check_target(method, raw, path)


def test_check_target_accepts_normal_paths() -> None:
    check_target("POST", "/v1/chat/completions?x=1", "/v1/chat/completions")
