"""Errors of the HTTP side, each with the status and OpenAI-style type a client sees, and the
outcome a request that ends with it is recorded with.

    WattproxyError
    ├── ConfigError              config file or env invalid (listed with key paths)
    ├── LedgerError              the ledger backend failed (records go to the spool)
    ├── WorkerError              worker processes could not start serving
    └── ProxyError               answered to the client as {"error": {...}}
        │                        status  type                    outcome
        ├── BadRequest           400     invalid_request_error   bad_request
        ├── Unauthorized         401     authentication_error    unauthorized
        ├── Forbidden            403     permission_error        forbidden
        ├── NotFound             404     not_found_error         not_found
        ├── RequestTimeout       408     request_timeout         client_timeout
        ├── PayloadTooLarge      413     invalid_request_error   payload_too_large
        ├── BudgetExceeded       429     carbon_budget_exceeded  budget_exceeded
        ├── NotSupported         501     invalid_request_error   not_supported
        ├── Overloaded           503     overloaded_error        overloaded
        ├── UpstreamUnavailable  502     upstream_error          upstream_unavailable
        └── UpstreamTimeout      504     upstream_timeout        upstream_timeout

Every ``ProxyError`` a handler raises is rendered once, by ``proxy.middleware``. aiohttp client
errors are mapped to the upstream ones in ``proxy.forward`` only.
"""

from __future__ import annotations

from typing import Any


class WattproxyError(Exception):
    """Root of every error raised by the proxy package."""


class ConfigError(WattproxyError):
    """Every problem of a config, each with its key path. ``config`` is the config as read
    when only checks beyond its shape failed, so ``check-config`` can go on to the files it
    names and list those problems too."""

    def __init__(self, problems: list[str], config: Any = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.config = config


class LedgerError(WattproxyError):
    """A ledger backend could not read or write."""


class WorkerError(WattproxyError):
    """Worker processes (``listen.workers``) could not start serving."""


class ProxyError(WattproxyError):
    """An error answered to the client. ``request_id`` and ``task`` are set by the handler
    once it knows them, for the error's response headers."""

    status = 500
    type = "internal_error"
    #: how a request that ends with this error is recorded (``RequestRecord.outcome``)
    outcome = "proxy_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra
        self.request_id: str | None = None
        self.task: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.extra}}


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    outcome = "bad_request"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    outcome = "unauthorized"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    outcome = "forbidden"


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"
    outcome = "not_found"


class RequestTimeout(ProxyError):
    """The client did not send its request body within ``listen.read_timeout_s``."""

    status = 408
    type = "request_timeout"
    outcome = "client_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    outcome = "payload_too_large"


class BudgetExceeded(ProxyError):
    status = 429
    type = "carbon_budget_exceeded"
    outcome = "budget_exceeded"


class NotSupported(ProxyError):
    """A well-formed request using what the proxy does not implement (RFC 9110 15.6.2)."""

    status = 501
    type = "invalid_request_error"
    outcome = "not_supported"


class Overloaded(ProxyError):
    """The proxy cannot account for more now (a worker's events wait past
    ``listen.max_event_backlog_bytes`` for the accounting process): refused before it is sent
    upstream, rather than served unaccounted or held in memory without bound."""

    status = 503
    type = "overloaded_error"
    outcome = "overloaded"


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "upstream_error"
    outcome = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_timeout"
    outcome = "upstream_timeout"
