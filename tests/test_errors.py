"""The error tree carries, per class, the status and type a client sees and the outcome its
request is recorded with; ``proxy.middleware`` renders every ``ProxyError`` once, whoever
raised it. And the environment the proxy reads its ``*_env`` secrets from is the one passed in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy import errors
from proxy.errors import ProxyError
from proxy.middleware import error_middleware
from tests.conftest import ProxyFactory, proxy_config, url_of

TREE = [
    (errors.BadRequest, 400, "invalid_request_error", "bad_request"),
    (errors.Unauthorized, 401, "authentication_error", "unauthorized"),
    (errors.Forbidden, 403, "permission_error", "forbidden"),
    (errors.NotFound, 404, "not_found_error", "not_found"),
    (errors.RequestTimeout, 408, "request_timeout", "client_timeout"),
    (errors.PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (errors.BudgetExceeded, 429, "carbon_budget_exceeded", "budget_exceeded"),
    (errors.NotSupported, 501, "invalid_request_error", "not_supported"),
    (errors.Overloaded, 503, "overloaded_error", "overloaded"),
    (errors.UpstreamUnavailable, 502, "upstream_error", "upstream_unavailable"),
    (errors.UpstreamTimeout, 504, "upstream_timeout", "upstream_timeout"),
]


@pytest.mark.parametrize(("cls", "status", "type_", "outcome"), TREE)
def test_each_error_carries_its_status_type_and_outcome(
    cls: type[ProxyError], status: int, type_: str, outcome: str
) -> None:
    err = cls("why")
    assert (err.status, err.type, err.outcome) == (status, type_, outcome)
    assert err.body() == {"error": {"type": type_, "message": "why"}}
    assert cls.__name__ in (errors.__doc__ or "")  # the tree is drawn in the module's docstring


def test_every_proxy_error_is_in_the_table() -> None:
    named = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, ProxyError) and obj is not ProxyError
    }
    assert named == {cls for cls, *_ in TREE}


async def _serve(aiohttp_server: Any, raised: ProxyError) -> TestServer:
    async def handler(request: web.Request) -> web.Response:
        raise raised

    app = web.Application(middlewares=[error_middleware(lambda: False)])
    app.router.add_route("*", "/{tail:.*}", handler)
    server: TestServer = await aiohttp_server(app)
    return server


async def test_a_raised_error_is_rendered_with_its_request_id_task_and_retry_after(
    aiohttp_server: Any,
) -> None:
    err = errors.BudgetExceeded("over budget", scope="user", retry_after_s=3600.4)
    err.request_id, err.task = "rid-1", "text-generation"
    server = await _serve(aiohttp_server, err)
    async with aiohttp.ClientSession() as s, s.post(url_of(server) + "/v1/x", json={}) as r:
        body = await r.json()
        assert r.status == 429
        assert r.headers["X-Request-Id"] == "rid-1"
        assert r.headers["X-Wattproxy-Task"] == "text-generation"
        assert r.headers["Retry-After"] == "3600"
    assert body == {
        "error": {"type": "carbon_budget_exceeded", "message": "over budget", "scope": "user"}
    }


async def test_a_foreign_target_is_refused_before_the_handler_and_its_body_not_read(
    aiohttp_server: Any,
) -> None:
    server = await _serve(aiohttp_server, errors.ProxyError("the handler must not run"))
    async with (
        aiohttp.ClientSession() as s,
        s.post(URL(url_of(server) + "/a/%2e%2e/b", encoded=True), data=b"x" * 100) as r,
    ):
        assert r.status == 400
        assert len(r.headers["X-Request-Id"]) == 32  # a fresh one: ids are not trusted here
        assert r.headers["Connection"].lower() == "close"  # the body is never read
        assert (await r.json())["error"]["message"] == "path traversal is not accepted"


async def test_the_environment_passed_in_is_where_secrets_are_read(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    seen: list[str | None] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    up: TestServer = await aiohttp_server(app)
    upstreams = [{"name": "llm", "url": url_of(up), "api_key_env": "WP_TEST_UPSTREAM_KEY"}]
    cfg = proxy_config(url_of(up), tmp_path, upstreams=upstreams)
    assert "WP_TEST_UPSTREAM_KEY" not in os.environ
    proxy, parts = await make_proxy(cfg, environ={"WP_TEST_UPSTREAM_KEY": "sk-passed-in"})
    assert parts.environ == {"WP_TEST_UPSTREAM_KEY": "sk-passed-in"}
    async with aiohttp.ClientSession() as s, s.get(url_of(proxy) + "/v1/models") as r:
        assert r.status == 200
    assert seen == ["Bearer sk-passed-in"]
