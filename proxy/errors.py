"""Errors of the HTTP side, each with the status and OpenAI-style type a client sees.

    WattproxyError
    ├── ConfigError              config file or env invalid (listed with key paths)
    ├── LedgerError              the ledger backend failed (records go to the spool)
    └── ProxyError               answered to the client as {"error": {...}}
        ├── BadRequest           400  invalid_request_error
        ├── Unauthorized         401  authentication_error
        ├── Forbidden            403  permission_error
        ├── NotFound             404  not_found_error
        ├── RequestTimeout       408  request_timeout
        ├── PayloadTooLarge      413  invalid_request_error
        ├── BudgetExceeded       429  carbon_budget_exceeded
        ├── NotSupported         501  invalid_request_error
        ├── UpstreamUnavailable  502  upstream_error
        └── UpstreamTimeout      504  upstream_timeout

aiohttp client errors are mapped to the upstream ones in ``proxy.forward`` only.
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


class ProxyError(WattproxyError):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.extra}}


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"


class RequestTimeout(ProxyError):
    """The client did not send its request body within ``listen.read_timeout_s``."""

    status = 408
    type = "request_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"


class BudgetExceeded(ProxyError):
    status = 429
    type = "carbon_budget_exceeded"


class NotSupported(ProxyError):
    """A well-formed request using what the proxy does not implement (RFC 9110 15.6.2)."""

    status = 501
    type = "invalid_request_error"


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "upstream_error"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_timeout"
