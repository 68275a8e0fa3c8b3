"""Header rules of a reverse proxy (RFC 9110 7.6.1): hop-by-hop headers, and those named in
``Connection``, are dropped both ways; request ids are honoured when sane. Pure."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
    )
)
#: Never sent upstream: the proxy sets them itself.
REQUEST_DROP = frozenset(("host", "content-length", "x-wattproxy-user", "x-wattproxy-team"))
RESPONSE_DROP = frozenset(("content-length", "x-wattproxy-task"))

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", []):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def filter_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], extra_drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Copy ``headers`` minus hop-by-hop ones, those named in ``Connection`` and ``extra_drop``."""
    drop = HOP_BY_HOP | connection_tokens(headers) | {h.lower() for h in extra_drop}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def request_id(client_value: str | None) -> str:
    """The client's ``X-Request-Id`` when it is short and plain, else a fresh one."""
    if client_value and _SANE_ID.match(client_value):
        return client_value
    return uuid.uuid4().hex
