"""Relaying the upstream's answer to the client: the response head, then the body chunk by
chunk as it arrives (``StreamResponse.write`` applies backpressure), each chunk shown to the
API's usage parser on its way (first byte and token deltas go to the accountant), and the
client's connection aborted when the upstream breaks off mid-answer.

A usage parser that raises never fails a request: the rest is relayed unparsed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy import energy_answer
from proxy.accounting import Accounts, OpenRequest
from proxy.bodies import is_json
from proxy.config import UpstreamConfig
from proxy.headers import RESPONSE_DROP, filter_headers
from proxy.tokens import TokenCounter
from proxy.usage import for_api
from proxy.usage.base import BodyUsage, RequestPlan, StreamUsage, Usage
from proxy.usage.energy_splice import UsageSplicer
from proxy.usage.resolve import resolve_usage

log = logging.getLogger("wattproxy.forward")

#: Outcomes of an answer the upstream broke off after its head was relayed.
BROKEN_OFF = frozenset(("upstream_timeout", "upstream_reset"))


def parser_failed(what: str, err: Exception) -> None:
    """A usage parser raised: the request goes on without it (a bug there must never fail a
    request or lose its record). The traceback only at debug: messages may quote the body."""
    log.warning(
        "usage parsing failed (%s: %s); the request goes on without it",
        what,
        type(err).__name__,
        exc_info=err if log.isEnabledFor(logging.DEBUG) else None,
    )


@dataclass(slots=True)
class Relay:
    """The state of one response being relayed."""

    parser: StreamUsage | None
    collector: BodyUsage | None
    tokens_seen: int = 0
    header_usage: Usage | None = None  # counts the upstream sent in response headers
    splice: UsageSplicer | None = None  # energy in a non-streamed JSON body's usage

    def usage(self, api: str, path: str, plan: RequestPlan, counter: TokenCounter | None) -> Usage:
        """The request's token counts from what was relayed (``proxy.usage.resolve``)."""
        return resolve_usage(
            api, path, plan, counter, self.parser, self.collector, self.header_usage
        )


async def start_response(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    rid: str,
    task: str,
    api: str,
    plan: RequestPlan,
    collect_text: bool,
    added_headers: dict[str, str] | None = None,
) -> tuple[web.StreamResponse, Relay]:
    """Send the client the upstream's response head (hop-by-hop headers dropped, the request id
    and task added) and choose how its body is parsed for usage.

    Args:
        collect_text: keep the generated text, for a tokenizer to count.
        added_headers: the proxy's own headers for this answer (routing's reason, deferral);
            none under the defaults.
    """
    ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    encoded = resp.headers.get("Content-Encoding", "identity").lower() != "identity"
    parser: StreamUsage | None = None
    collector: BodyUsage | None = None
    if not encoded:
        try:
            parser = for_api(api).stream(request.path, ctype, plan, collect_text)
        except Exception as err:
            parser_failed(f"{api} stream of {request.path}", err)
        if parser is None and is_json(ctype):
            collector = BodyUsage()
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    out.headers.extend(filter_headers(resp.headers, RESPONSE_DROP))
    # energy in the answer: a body splicer, and Content-Length dropped if the body grows
    splice, keep_length = energy_answer.start(resp.status, plan, parser, collector, out.headers)
    if resp.content_length is not None and not plan.inject_usage and keep_length:
        out.content_length = resp.content_length
    out.headers["X-Request-Id"] = rid
    out.headers["X-Wattproxy-Task"] = task
    if added_headers:
        out.headers.update(added_headers)
    await out.prepare(request)
    header_usage: Usage | None = None
    try:
        header_usage = for_api(api).headers(request.path, resp.headers)
    except Exception as err:
        parser_failed(f"{api} headers of {request.path}", err)
    return out, Relay(parser, collector, header_usage=header_usage, splice=splice)


async def relay_body(
    resp: aiohttp.ClientResponse,
    out: web.StreamResponse,
    acc: Accounts,
    req: OpenRequest,
    relay: Relay,
) -> str:
    """Copy the body chunk by chunk; returns the outcome (``ok``, ``upstream_timeout``,
    ``upstream_reset``, ``client_disconnect``)."""
    parser, collector = relay.parser, relay.collector
    first = True
    while True:
        try:
            chunk = await resp.content.readany()
        except TimeoutError:
            return "upstream_timeout"
        except (aiohttp.ClientError, OSError):
            return "upstream_reset"
        if not chunk:
            break
        if first:
            first = False
            acc.first_byte(req)
        if parser is not None:
            try:
                data = parser.feed(chunk)
            except Exception as err:  # relay the rest as it comes, unparsed
                parser_failed(type(parser).__name__, err)
                relay.parser = parser = None
                data = chunk
            if parser is not None and parser.tokens != relay.tokens_seen:
                acc.tokens(req, parser.tokens - relay.tokens_seen)
                relay.tokens_seen = parser.tokens
        else:
            if collector is not None:
                collector.feed(chunk)
            data = chunk if relay.splice is None else relay.splice.feed(chunk)
        if data:
            try:
                await out.write(data)
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                return "client_disconnect"
    if first:
        acc.first_byte(req)
    try:
        if parser is not None:
            try:
                tail = parser.flush()
            except Exception as err:
                parser_failed(type(parser).__name__, err)
                tail = b""
            if tail:
                await out.write(tail)
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return "client_disconnect"
    return "ok"


def abort_client(request: web.Request, upstream: UpstreamConfig, outcome: str) -> None:
    """The upstream broke off mid-answer: so does the client's connection (as nginx and
    Envoy do), never a clean end that would pass a truncated answer off as whole."""
    why = (
        f"sent nothing for {upstream.timeouts.idle_s:g} s (timeouts.idle_s)"
        if outcome == "upstream_timeout"
        else "broke the connection"
    )
    log.warning("upstream %r %s mid-answer; the client's connection is aborted", upstream.name, why)
    if request.transport is not None:
        request.transport.abort()
