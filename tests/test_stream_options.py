"""vLLM's ``stream_options`` through the proxy: for every combination of ``include_usage`` and
``continuous_usage_stats`` the client gets exactly the bytes vLLM would send it directly, and
the record's token counts are the server's (or, where vLLM sends none, one per generated chunk).

vLLM decides what a stream carries with ``should_include_usage``
(``vllm/entrypoints/openai/serving_chat.py``, later ``serve/utils/api_utils.py``):
``include_usage`` adds a final usage-only chunk (``choices: []``), and
``include_continuous_usage = include_usage and continuous_usage_stats`` adds the cumulative
``usage`` to every chunk. ``continuous_usage_stats`` alone therefore changes nothing (vLLM's own
``test_completion_stream_options`` asserts ``chunk.usage is None`` for it); but once the proxy
added ``include_usage`` it would switch on usage in every chunk, which the proxy cannot take
back. The replays below are vLLM 0.10's bytes (pydantic ``model_dump_json(exclude_unset=True)``:
``prompt_token_ids`` and ``token_ids`` set to null explicitly, ``UsageInfo`` in field order
prompt, total, completion; the final usage chunk with ``exclude_none``), for a 7-token prompt
and the answer "a b c" ended by an end-of-sequence token (4 completion tokens: the EOS is sent
as an empty ``content`` and counted by vLLM).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.standins import Recorder
from tests.conftest import ProxyFactory, url_of
from tests.helpers.through_proxy import call, upstream_config
from tests.helpers.vllm_streams import PROMPT_TOKENS, vllm_stream


class VLLM(Recorder):
    """Replays ``vllm_stream`` for the options the request carries, read as vLLM reads them."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await self.receive_json(request)
        options = doc.get("stream_options") or {}
        include = bool(options.get("include_usage"))
        resp = await self.open_stream(request, "text/event-stream; charset=utf-8")
        continuous = include and bool(options.get("continuous_usage_stats"))
        for event in vllm_stream(include, continuous).split(b"\n\n")[:-1]:
            await self.write(resp, event + b"\n\n")
        await resp.write_eof()
        return resp


CHAT = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
SERVER = (PROMPT_TOKENS, 4, "server")
# no usage from vLLM: one token per generated chunk (the EOS's empty one included), the prompt
# estimated from its 13 bytes
COUNTED = (4, 4, "estimate")


@pytest.mark.parametrize(
    ("options", "counts"),
    [
        (None, SERVER),  # the proxy asks for usage and removes the usage chunk
        ({"include_usage": True}, SERVER),
        ({"continuous_usage_stats": True}, COUNTED),
        ({"include_usage": False, "continuous_usage_stats": True}, COUNTED),
        ({"include_usage": True, "continuous_usage_stats": True}, SERVER),
        ({"include_usage": False, "continuous_usage_stats": False}, SERVER),
    ],
)
async def test_client_gets_exactly_what_vllm_sends_it_for_every_stream_option(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    options: dict[str, bool] | None,
    counts: tuple[int, int, str],
) -> None:
    vllm = VLLM()
    up = await aiohttp_server(vllm.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "openai"))
    body: dict[str, Any] = dict(CHAT)
    if options is not None:
        body["stream_options"] = options
    got = await call(url_of(proxy), "/v1/chat/completions", body)
    asked = options or {}
    include = bool(asked.get("include_usage"))
    direct = vllm_stream(include, include and bool(asked.get("continuous_usage_stats")))
    assert got.body == direct
    rec = got.record
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["tokens_source"]) == counts


async def test_continuous_usage_stats_alone_reaches_vllm_unchanged(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Adding ``include_usage`` would turn on usage in every chunk: the body goes as sent."""
    vllm = VLLM()
    up = await aiohttp_server(vllm.app())
    proxy, _ = await make_proxy(upstream_config(url_of(up), tmp_path, "openai"))
    body = {**CHAT, "stream_options": {"continuous_usage_stats": True}}
    await call(url_of(proxy), "/v1/chat/completions", body)
    assert vllm.seen[-1].body == json.dumps(body).encode()  # aiohttp's json= writes json.dumps
