"""Header rules of a reverse proxy (RFC 9110 7.6.1): hop-by-hop headers, and those named in
``Connection``, are dropped both ways; and which request id the proxy keys a request by. Pure."""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Callable, Iterable

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
REQUEST_DROP = frozenset(
    ("host", "content-length", "x-wattproxy-user", "x-wattproxy-team", "x-wattproxy-energy")
)
RESPONSE_DROP = frozenset(("content-length", "x-wattproxy-task"))

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

#: Draws fresh request ids: seeded from the OS, private so that a ``random.seed()`` elsewhere in
#: the process cannot repeat ids, and reseeded in forked children so they cannot either.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", []):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def filter_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], extra_drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Copy ``headers`` minus hop-by-hop ones, those named in ``Connection`` and ``extra_drop``."""
    if isinstance(extra_drop, frozenset):
        drop = _dropped(extra_drop)  # the usual case, per request and response: built once
    else:
        drop = HOP_BY_HOP | {h.lower() for h in extra_drop}
    if "Connection" in headers:
        drop = drop | connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


@functools.lru_cache(maxsize=64)
def _dropped(extra_drop: frozenset[str]) -> frozenset[str]:
    return HOP_BY_HOP | {h.lower() for h in extra_drop}


def client_request_id(value: str | None) -> str | None:
    """The client's ``X-Request-Id`` when it is short and plain, else ``None``."""
    if value and _SANE_ID.match(value):
        return value
    return None


def new_request_id() -> str:
    """A fresh id: 128 random bits as 32 hex digits, like ``uuid.uuid4().hex`` but without its
    ``os.urandom`` syscall per id (ids need not be secret: records are access-checked by user)."""
    return f"{_ids.getrandbits(128):032x}"


def request_id(
    client_id: str | None,
    *,
    trust: bool,
    in_flight: Callable[[str], bool] = lambda _: False,
) -> str:
    """The id a request is keyed by (response, record, ledger, budgets, upstream). Ledgers store
    an id once, so a client's own id is used only when ``trust`` says the ids come from a
    gateway that makes them unique (``identity.trust_request_id``), and even then not while a
    request with that id is ``in_flight`` in this process; otherwise a fresh one.

    Args:
        client_id: the client's plain id (``client_request_id``), or ``None``.
    """
    if trust and client_id is not None and not in_flight(client_id):
        return client_id
    return new_request_id()
