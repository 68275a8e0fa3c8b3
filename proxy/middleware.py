"""Every ``ProxyError`` becomes the JSON error a client gets, here and only here: the request's
target and framing are checked before routing (``proxy.target``), and whatever error a handler
raises is rendered with its status, the request id and task when known, and ``Retry-After`` for
an exhausted budget."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.errors import ProxyError
from proxy.headers import client_request_id, request_id
from proxy.target import check_framing, check_target


def json_error(err: ProxyError, rid: str | None = None, task: str | None = None) -> web.Response:
    """The response for ``err``: ``{"error": {...}}`` with its status; ``X-Request-Id`` and
    ``X-Wattproxy-Task`` when known, ``Retry-After`` for a 429 that says when to retry."""
    headers = {}
    if rid:
        headers["X-Request-Id"] = rid
    if task:
        headers["X-Wattproxy-Task"] = task
    if err.status == 429 and "retry_after_s" in err.extra:
        headers["Retry-After"] = str(int(err.extra.pop("retry_after_s")))
    return web.json_response(err.body(), status=err.status, headers=headers)


def error_middleware(trust_request_id: Callable[[], bool]) -> Middleware:
    """The proxy's one middleware: refuse foreign targets (CONNECT, absolute-form, encoded
    slashes, traversal, unknown transfer codings) before routing, so this is a reverse proxy and
    never an open one, and render every ``ProxyError`` a handler raises.

    Args:
        trust_request_id: whether a client's ``X-Request-Id`` may key its request now
            (``identity.trust_request_id`` of the config in force).
    """

    @web.middleware
    async def proxy_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            check_target(request.method, request.raw_path, request.path)
            check_framing(request.headers.get("Transfer-Encoding"))
        except ProxyError as err:
            client_id = client_request_id(request.headers.get("X-Request-Id"))
            resp = json_error(err, request_id(client_id, trust=trust_request_id()))
            if request.body_exists:
                resp.force_close()  # the body, never read, must not be taken for a request
            return resp
        try:
            return await handler(request)
        except ProxyError as err:
            return json_error(err, err.request_id, err.task)

    return proxy_errors
