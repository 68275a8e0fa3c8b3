"""wattproxy in front of any HTTP API (``api: generic``): bodies relayed untouched both ways, the
task from the upstream's ``tasks`` config, duration-only records (no tokens invented)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.standins import Recorder
from proxy.tasks import task_for
from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config


class Custom(Recorder):
    """A made-up image service: JSON in, PNG bytes out; raw bytes in, a JSON digest out."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/sdapi/v1/txt2img", self.txt2img)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/status", self.status)
        return app

    async def txt2img(self, request: web.Request) -> web.StreamResponse:
        await self.receive(request)
        resp = await self.open_stream(request, "image/png")
        for _ in range(4):
            await self.write(resp, b"\x89PNG\r\n\x1a\n" + os.urandom(1000))
        await resp.write_eof()
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        body = await self.receive(request)
        digest = hashlib.sha256(body).hexdigest()
        return self.reply(
            f'{{"sha256":"{digest}","usage":{{"prompt_tokens":9}}}}'.encode(), "application/json"
        )

    async def status(self, request: web.Request) -> web.Response:
        await self.receive(request)
        return self.reply(b'{"ok":true}', "application/json")


TASKS = {"/sdapi/v1/txt2img": "text-to-image", "/upload": "image-classification"}


async def start(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> tuple[str, Custom]:
    custom = Custom()
    up = await aiohttp_server(custom.app())
    cfg = upstream_config(url_of(up), tmp_path, "generic", tasks=TASKS)
    proxy, _ = await make_proxy(cfg)
    return url_of(proxy), custom


async def test_json_in_binary_out_is_relayed_and_timed_only(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    base, custom = await start(aiohttp_server, make_proxy, tmp_path)
    got = await call(base, "/sdapi/v1/txt2img", {"prompt": "a red fox", "steps": 20})
    assert got.status == 200
    assert got.body == bytes(custom.sent[-1])
    assert len(got.body) == 4 * 1008
    assert got.headers["X-Wattproxy-Task"] == "text-to-image"
    rec = got.record
    assert rec["task"] == "text-to-image"
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (None, None)
    assert rec["tokens_source"] == "none"
    assert rec["duration_s"] > 0
    assert rec["energy_j"] > 0


async def test_binary_upload_untouched_and_usage_not_guessed(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    base, custom = await start(aiohttp_server, make_proxy, tmp_path)
    blob = os.urandom(3 * 1024 * 1024 + 17)
    got = await call(
        base, "/upload", data=blob, headers={"Content-Type": "application/octet-stream"}
    )
    assert custom.seen[-1].body == blob
    assert got.body == bytes(custom.sent[-1])
    assert hashlib.sha256(blob).hexdigest().encode() in got.body
    rec = got.record
    assert rec["task"] == "image-classification"
    # a generic upstream's body is not parsed, even when it looks like OpenAI usage
    assert (rec["prompt_tokens"], rec["tokens_source"]) == (None, "none")


async def test_unlisted_path_is_other(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    base, _ = await start(aiohttp_server, make_proxy, tmp_path)
    got = await call(base, "/status", method="GET")
    assert got.body == b'{"ok":true}'
    assert got.record["task"] == "other"
    assert got.record["energy_j"] == 0


@pytest.mark.parametrize(
    ("path", "overrides", "model_task", "method", "task"),
    [
        ("/run", {}, "text-to-image", "POST", "text-to-image"),  # the model's task
        ("/run", {"*": "summarization"}, "text-to-image", "POST", "summarization"),
        ("/run", {"/run": "translation", "*": "summarization"}, None, "POST", "translation"),
        ("/health", {"*": "summarization"}, "text-to-image", "POST", "other"),
        ("/run", {}, "text-to-image", "GET", "other"),
        ("/v1/chat/completions", {}, "summarization", "POST", "summarization"),
        ("/", {}, "text-to-image", "POST", "text-to-image"),
    ],
)
def test_generic_task_order(
    path: str, overrides: dict[str, str], model_task: str | None, method: str, task: str
) -> None:
    assert task_for(path, overrides, "generic", model_task=model_task, method=method) == task
