"""The upstreams' HTTP client sessions: one per upstream, with its connection limit, connect
timeout and TLS trust, no cookies and no decompression (bytes and ``Content-Encoding`` stay
true). A reload that changes an upstream builds it a new session and retires the old one, which
is closed once the requests still streaming through it are done (at once when none are)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from typing import Any

import aiohttp

from proxy.config import UpstreamConfig

log = logging.getLogger("wattproxy.sessions")

#: Seconds an idle upstream connection is kept for reuse.
KEEPALIVE_S = 60.0


class UpstreamSession:
    """One upstream's ``ClientSession`` and how many requests are using it now."""

    __slots__ = ("in_flight", "retired", "session")

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.in_flight = 0
        self.retired = False


def client_ssl(upstream: UpstreamConfig) -> ssl.SSLContext | bool:
    """The TLS trust for an ``https`` upstream: its ``ca_file``, else the system's."""
    if upstream.ca_file:
        return ssl.create_default_context(cafile=upstream.ca_file)
    return True


def client_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    t = upstream.timeouts
    connector = aiohttp.TCPConnector(
        limit=upstream.max_connections, ssl=client_ssl(upstream), keepalive_timeout=KEEPALIVE_S
    )
    return aiohttp.ClientSession(
        connector=connector,
        # no read timeout on the response head: forward times it by first_byte_s, then arms
        # idle_s between body chunks
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class Sessions:
    """Every upstream session this process opened and has not closed: the ones in use, and
    those a reload retired while requests still streamed through them."""

    def __init__(self) -> None:
        self._open: set[UpstreamSession] = set()
        self._closing: set[asyncio.Task[Any]] = set()

    def open(self, upstream: UpstreamConfig) -> UpstreamSession:
        """A new session for ``upstream`` (inside the running loop)."""
        us = UpstreamSession(client_session(upstream))
        self._open.add(us)
        return us

    @staticmethod
    def acquire(us: UpstreamSession) -> None:
        """A request starts using ``us``; ``release`` it when its answer is done."""
        us.in_flight += 1

    def release(self, us: UpstreamSession) -> None:
        us.in_flight -= 1
        if us.retired and us.in_flight <= 0:
            self._close(us)

    def retire(self, sessions: Iterable[UpstreamSession]) -> None:
        """No new request will use these: close each once its last request is done."""
        for us in sessions:
            us.retired = True
            if us.in_flight <= 0:
                self._close(us)

    @property
    def retired(self) -> int:
        """Retired sessions still open (requests stream through them)."""
        return sum(1 for us in self._open if us.retired)

    def _close(self, us: UpstreamSession) -> None:
        if us not in self._open:
            return
        self._open.discard(us)
        task = asyncio.get_running_loop().create_task(
            us.session.close(), name="wattproxy:close-session"
        )
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[Any]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("closing a retired upstream session failed: %s", task.exception())

    async def close_all(self) -> None:
        """At shutdown: close every session, retired or not, and wait for the closes."""
        for us in list(self._open):
            self._close(us)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
