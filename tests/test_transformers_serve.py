"""End to end against a real OpenAI-compatible server: ``transformers serve`` on CPU, offline,
serving a random-weight tiny Llama built here, behind a real wattproxy. The proxy's records must
match the server's own usage, streamed and not, and the client must get the server's bytes.

Since transformers 5.25, ``transformers serve`` (``cli/serving``) streams usage only when asked
(``stream_options.include_usage``, a last ``"choices":[]`` chunk, as OpenAI does; 5.24 put it on
every stream's finish chunk), and a stream that fell behind the model sends the texts of several
tokens as one event (``BaseHandler.read_queue_outputs``): how a text is cut into events then
depends on timing, and two answers to one request can differ in that only.

Needs ``pip install 'transformers[serving]'`` and a CPU build of torch; skipped without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config

pytestmark = pytest.mark.slow

SERVING_MODULES = ("torch", "fastapi", "uvicorn", "openai", "accelerate")
MISSING = [m for m in SERVING_MODULES if importlib.util.find_spec(m) is None]
#: Seconds for the server to load the model and answer /health (about 10 s on 2 cores).
READY_TIMEOUT_S = 120.0
MESSAGES = [{"role": "user", "content": "hello world how are you"}]

if MISSING:
    pytest.skip(
        f"transformers serve needs {', '.join(MISSING)}: "
        "pip install 'transformers[serving]' torch (the CPU build)",
        allow_module_level=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_command(model: Path, port: int) -> list[str]:
    cli = Path(sys.executable).with_name("transformers")
    head = [str(cli)] if cli.exists() else [sys.executable, "-m", "transformers.cli.transformers"]
    return [
        *head,
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"transformers serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"transformers serve not ready in {READY_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_model import build_llama

    return build_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module: started on a free port, always stopped."""
    port = free_port()
    home = tmp_path_factory.mktemp("serve")
    log = home / "serve.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "NO_PROXY": "127.0.0.1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(serve_command(model_dir, port), stdout=out, stderr=out, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def direct(url: str, path: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        assert r.status == 200
        return await r.read()


def server_usage(body: bytes) -> dict[str, Any]:
    """The usage the server reported, from a JSON body or the last SSE event carrying it."""
    if not body.startswith(b"data:"):
        usage: dict[str, Any] = json.loads(body)["usage"]
        return usage
    found: dict[str, Any] = {}
    for line in body.split(b"\n"):
        if line.startswith(b"data:") and b'"usage"' in line and line[5:].strip() != b"[DONE]":
            doc = json.loads(line[5:])
            found = doc.get("usage") or doc.get("response", {}).get("usage") or found
    return found


def strip_volatile(body: bytes) -> bytes:
    """Ids and timestamps differ between two answers of the server, and so do the Responses
    events' numbers where texts were joined (see ``same_answer``); the rest must not."""
    return re.sub(
        rb'"(id|created|created_at|item_id|sequence_number)":("[^"]*"|[0-9.]+)', b"", body
    )


#: An event's text: a chat delta's ``content``, a completion's ``text``, a Responses ``delta``.
TEXT_PIECE = re.compile(rb'"(?:content|text|delta)":"((?:[^"\\]|\\.)*)"')


def same_answer(body: bytes) -> bytes | list[tuple[bytes, bytes]]:
    """What two answers to one greedy request share: a JSON body less its volatile fields; a
    stream as its events, each with its text taken out and beside it, consecutive events
    that are the same apart from their text joined into one. transformers serve 5.25 joins
    the texts of the tokens a stream fell behind on, at its own pace (module docstring)."""
    if not body.startswith(b"data:"):
        return strip_volatile(body)
    out: list[tuple[bytes, bytes]] = []
    for event in strip_volatile(body).split(b"\n\n"):
        m = TEXT_PIECE.search(event)
        if m is None:
            out.append((event, b""))
            continue
        rest = event[: m.start(1)] + event[m.end(1) :]
        if out and out[-1][0] == rest and out[-1][1]:
            out[-1] = (rest, out[-1][1] + m.group(1))
        else:
            out.append((rest, m.group(1)))
    return out


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "stream": True}),
        (
            "/v1/chat/completions",
            {
                "messages": MESSAGES,
                "max_tokens": 6,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
        ("/v1/completions", {"prompt": "the quick brown fox", "max_tokens": 5}),
        ("/v1/completions", {"prompt": "the quick brown fox", "max_tokens": 5, "stream": True}),
        ("/v1/responses", {"input": "hello world", "max_output_tokens": 4}),
        ("/v1/responses", {"input": "hello world", "max_output_tokens": 4, "stream": True}),
    ],
)
async def test_records_match_the_servers_own_usage(
    server: str,
    model_dir: Path,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    path: str,
    body: dict[str, Any],
) -> None:
    proxy, _ = await make_proxy(
        upstream_config(server, tmp_path, "openai", name="tf", model_path=str(model_dir))
    )
    request = {"model": str(model_dir), "temperature": 0, **body}
    got = await call(url_of(proxy), path, request)
    assert got.status == 200, got.body[:500]
    reference = await direct(server, path, request)  # greedy: the same answer again
    assert same_answer(got.body) == same_answer(reference)
    # a stream the client asked without usage has none since transformers 5.25: ask for it
    usage = server_usage(got.body) or server_usage(
        await direct(server, path, {**request, "stream_options": {"include_usage": True}})
    )
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    assert isinstance(prompt, int) and prompt > 0
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (prompt, completion)
    assert rec["tokens_source"] == "server"
    assert rec["task"] == "text-generation"
    assert rec["upstream"] == "tf"
    assert rec["energy_j"] > 0
