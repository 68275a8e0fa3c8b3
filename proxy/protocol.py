"""aiohttp's server protocol: the per-connection limits of a listener, and what its HTTP parser
refuses answered in the proxy's own shape.

aiohttp answers a malformed request head itself, before any handler or middleware runs: plain
text, no ``X-Request-Id``, and a message that quotes the offending bytes back (a header may hold
a key). ``ProxyRunner`` serves the app with a protocol whose error answer is the JSON error
every other refusal gets, with a fresh request id and a reason that quotes nothing; its log line
says what was refused, without a traceback (``PeerErrorLog``).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.config import Config
from proxy.errors import BadRequest, ProxyError
from proxy.headers import new_request_id
from proxy.middleware import json_error

#: The longest reason taken from a parser message (llhttp's reasons are short phrases).
MAX_REASON_CHARS = 80
#: Bytes of one request header line (name and value) and headers per request; past them the
#: request is refused with 400 before any handler runs (aiohttp's parser enforces both).
MAX_HEADER_FIELD_BYTES = 8190
MAX_HEADERS = 128


class PeerErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, minus the traceback of a malformed request: a peer's bad bytes
    are its own problem, logged on one line and without the bytes (a header may hold a key)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            kwargs["exc_info"] = None
            msg = f"{msg}: refused a malformed request (%s, HTTP %s)"
            args = (*args, type(exc).__name__, exc.code)
            level = min(level, logging.INFO)
        super().log(level, msg, *args, **kwargs)


def handler_args(cfg: Config) -> dict[str, Any]:
    """Per-connection limits of the main listener. aiohttp has no header read timeout, but
    its keep-alive timer runs from the moment a connection opens (and from the end of each
    response) and closes a connection still waiting for a complete request head: set to
    ``listen.read_timeout_s`` it is the slow-loris guard for headers (bodies: ``bodies``)."""
    return {
        "keepalive_timeout": cfg.listen.read_timeout_s,
        "max_field_size": MAX_HEADER_FIELD_BYTES,
        "max_line_size": MAX_HEADER_FIELD_BYTES,
        "max_headers": MAX_HEADERS,
        "logger": PeerErrorLog(logging.getLogger("aiohttp.server"), {}),
    }


class InternalError(ProxyError):
    status = 500
    type = "internal_error"


def refusal(status: int, exc: BaseException | None) -> ProxyError:
    """The error a client gets for what aiohttp refused, named without quoting its bytes."""
    if status >= 500 or not isinstance(exc, HttpProcessingError):
        return InternalError("the proxy failed to handle the request")
    if isinstance(exc, LineTooLong):
        return BadRequest("malformed request: a request line or header field is too long")
    # llhttp's messages are "Reason:\n\n  b'<the offending line>'\n  ^": keep the reason
    reason = exc.message.split(":\n", 1)[0].strip() if exc.message else ""
    if not reason or len(reason) > MAX_REASON_CHARS or "b'" in reason or 'b"' in reason:
        reason = type(exc).__name__
    return BadRequest(f"malformed request: {reason}")


class JsonErrorRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own: logs (one line, see PeerErrorLog) and refuses once bytes are out
        super().handle_error(request, status, exc, message)
        resp = json_error(refusal(status, exc), new_request_id())
        resp.force_close()
        return resp


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer parse errors as JSON (see the module doc)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # the application builds a plain Server; its subclass only overrides the protocol
        # factory, adding no state, so the instance is re-classed rather than rebuilt
        server.__class__ = JsonErrorServer
        return server
