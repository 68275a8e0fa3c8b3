"""The proxy handler: identify, route, check the budget, forward, relay the answer chunk by
chunk, and account for the request - whatever happens to either peer on the way.

aiohttp client errors are translated to ``proxy.errors`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from estimators.estimator import RequestShape
from proxy.accounting import Accountant, OpenRequest
from proxy.config import Config, UpstreamConfig
from proxy.errors import (
    BadRequest,
    NotFound,
    NotSupported,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.headers import (
    REQUEST_DROP,
    RESPONSE_DROP,
    client_request_id,
    filter_headers,
    request_id,
)
from proxy.identity import Identity, IdentityResolver
from proxy.metrics import Metrics
from proxy.records import RequestRecord, utc_now_iso
from proxy.routing import Router
from proxy.tasks import OTHER, task_for
from proxy.tokens import TokenCounter, estimate_tokens
from proxy.tracing import NullTracing
from proxy.usage import for_api, json_endpoint, upload_probe
from proxy.usage.base import (
    BodyUsage,
    RequestPlan,
    StreamUsage,
    UploadProbe,
    Usage,
    parse_json,
    weaker_source,
)

log = logging.getLogger("wattproxy.forward")

BODY_METHODS = frozenset(("POST", "PUT", "PATCH", "DELETE"))
#: Outcomes of an answer the upstream broke off after its head was relayed.
BROKEN_OFF = frozenset(("upstream_timeout", "upstream_reset"))
#: Request headers not sent upstream when clients authenticate to the proxy with its own keys.
REQUEST_DROP_WITH_KEYS = REQUEST_DROP | {"authorization", "x-api-key"}


#: Budget check: raises ``BudgetExceeded`` for an identity over its budget, else reserves the
#: request's expected grams (by request id, from its shape) until its record is final.
BudgetCheck = Callable[[Identity, str, RequestShape], Awaitable[None]]


def json_error(err: ProxyError, rid: str | None = None, task: str | None = None) -> web.Response:
    headers = {}
    if rid:
        headers["X-Request-Id"] = rid
    if task:
        headers["X-Wattproxy-Task"] = task
    if err.status == 429 and "retry_after_s" in err.extra:
        headers["Retry-After"] = str(int(err.extra.pop("retry_after_s")))
    return web.json_response(err.body(), status=err.status, headers=headers)


def check_target(method: str, raw_path: str, path: str) -> None:
    """Refuse what would make this an open proxy or escape the upstream's path space."""
    if method == "CONNECT":
        raise BadRequest("CONNECT is not supported: this is a reverse proxy")
    if raw_path == "*":
        raise NotSupported(
            "OPTIONS * (a request about the server as a whole) is not supported: "
            "send OPTIONS to a path"
        )
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        raise BadRequest("absolute-form request targets are not accepted")
    raw = raw_path.split("?", 1)[0].lower()
    if "%2f" in raw or "%5c" in raw or "\\" in raw:
        raise BadRequest("encoded slashes are not accepted in the path")
    segments = path.split("/")
    if ".." in segments or "." in segments or "%2e" in raw:
        raise BadRequest("path traversal is not accepted")


def check_framing(transfer_encoding: str | None) -> None:
    """Only ``chunked`` framing is understood: a body also gzip- or br-coded in transit would be
    forwarded as if it were not (RFC 9112 6.1: answer 501 to a coding not understood)."""
    if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
        raise NotSupported(
            "Transfer-Encoding other than 'chunked' is not supported "
            "(send the body chunked, or with Content-Length and a Content-Encoding)"
        )


def parser_failed(what: str, err: Exception) -> None:
    """A usage parser raised: the request goes on without it (a bug there must never fail a
    request or lose its record). The traceback only at debug: messages may quote the body."""
    log.warning(
        "usage parsing failed (%s: %s); the request goes on without it",
        what,
        type(err).__name__,
        exc_info=err if log.isEnabledFor(logging.DEBUG) else None,
    )


def plan_request(api: str, path: str, doc: Any) -> RequestPlan:
    """The API's plan for a JSON request body; if its parser fails, the body goes untouched,
    routed by its ``model`` alone."""
    try:
        return for_api(api).plan(path, doc)
    except Exception as err:
        parser_failed(f"{api} request to {path}", err)
        return for_api("generic").plan(path, doc)


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def _body_chunks(
    request: web.Request, limit: int, timeout_s: float | None
) -> AsyncIterator[bytes]:
    """The request body as it arrives: refused once it passes ``limit`` bytes, or when the
    whole body has not arrived ``timeout_s`` seconds after the first read (slow-loris guard)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    size = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await request.content.readany()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {timeout_s:g} s"
            ) from None
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        yield chunk


async def read_limited(request: web.Request, limit: int, timeout_s: float | None = None) -> bytes:
    length = request.content_length
    if length is not None and length <= limit:
        # the body cannot outgrow its Content-Length: one read under one deadline (a timeout
        # context per chunk costs more than the read of a small body)
        try:
            async with asyncio.timeout(timeout_s):
                return await request.content.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {timeout_s:g} s"
            ) from None
    return b"".join([chunk async for chunk in _body_chunks(request, limit, timeout_s)])


async def counted_body(
    request: web.Request, limit: int, timeout_s: float | None = None
) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused once it passes ``limit`` or ``timeout_s``."""
    async for chunk in _body_chunks(request, limit, timeout_s):
        yield chunk


async def armed_when_sent(
    body: AsyncIterator[bytes], timer: asyncio.Timeout, first_byte_s: float
) -> AsyncIterator[bytes]:
    """The body unchanged; once it is all sent, ``timer`` gives the upstream ``first_byte_s``."""
    async for chunk in body:
        yield chunk
    if not timer.expired():
        with contextlib.suppress(RuntimeError):  # the answer came first: the timer is gone
            timer.reschedule(asyncio.get_running_loop().time() + first_byte_s)


async def observed(body: AsyncIterator[bytes], probe: UploadProbe) -> AsyncIterator[bytes]:
    """The body unchanged, each chunk shown to ``probe`` on its way (e.g. a WAV header)."""
    async for chunk in body:
        probe.feed(chunk)
        yield chunk


@dataclass(slots=True)
class Relay:
    """The state of one response being relayed."""

    parser: StreamUsage | None
    collector: BodyUsage | None
    tokens_seen: int = 0
    header_usage: Usage | None = None  # counts the upstream sent in response headers


class Forwarder:
    def __init__(
        self,
        cfg: Config,
        router: Router,
        sessions: dict[str, aiohttp.ClientSession],
        accountant: Accountant,
        identity: IdentityResolver,
        metrics: Metrics,
        counters: dict[str, TokenCounter] | None = None,
        model_tasks: dict[str, str] | None = None,
        budget_check: BudgetCheck | None = None,
        upstream_keys: dict[str, str] | None = None,
        tracing: NullTracing | None = None,
    ) -> None:
        self.cfg = cfg
        self.router = router
        self.sessions = sessions
        self.accountant = accountant
        self.identity = identity
        self.metrics = metrics
        self.counters = counters or {}
        self.model_tasks = model_tasks if model_tasks is not None else {}
        self.budget_check = budget_check
        self.upstream_keys = upstream_keys or {}
        self.tracing = tracing or NullTracing()  # HOOK(tracing)
        #: trusted client ids being handled, before the accountant holds them (budget, body)
        self._claimed: set[str] = set()

    def reconfigure(
        self,
        cfg: Config,
        router: Router,
        sessions: dict[str, aiohttp.ClientSession],
        budget_check: BudgetCheck | None,
        upstream_keys: dict[str, str],
    ) -> None:
        """Swap in a reloaded config. No await here, so every request sees either the old
        state or the new one; requests already routed finish on their old upstream."""
        self.cfg = cfg
        self.router = router
        self.sessions = sessions
        self.budget_check = budget_check
        self.upstream_keys = upstream_keys

    async def handle(self, request: web.Request) -> web.StreamResponse:
        client_id = client_request_id(request.headers.get("X-Request-Id"))
        rid = request_id(
            client_id, trust=self.cfg.identity.trust_request_id, in_flight=self.in_flight
        )
        claimed = rid == client_id  # only a client's id can come twice: held until accounted
        if claimed:
            self._claimed.add(rid)
        task: str | None = None
        try:  # the target was checked by the app's middleware (check_target)
            who = self.identity.resolve(request.headers)
            upstream, plan, data = await self._read_and_route(request)
            task = task_for(
                request.path,
                upstream.tasks,
                upstream.api,
                model_task=self.model_tasks.get(upstream.name),
                method=request.method,
            )
            if self.budget_check is not None and task != OTHER:
                shape = RequestShape(
                    upstream.name,
                    plan.model,
                    task,
                    prompt_tokens=self._prompt_estimate(plan, data),
                    completion_tokens=plan.max_tokens,
                    images=plan.images,
                )
                await self.budget_check(who, rid, shape)
            return await self._forward(request, rid, who, upstream, task, plan, data, client_id)
        except ProxyError as err:
            if err.status == 429:
                self.metrics.budget_rejections.labels(err.extra.get("scope", "user")).inc()
            return json_error(err, rid, task)
        finally:
            if claimed:
                self._claimed.discard(rid)

    def in_flight(self, rid: str) -> bool:
        """A request with this id is being handled or accounted for (until its record is final)."""
        return rid in self._claimed or rid in self.accountant.requests

    async def _read_and_route(
        self, request: web.Request
    ) -> tuple[UpstreamConfig, RequestPlan, Any]:
        limit = self.cfg.limits.max_body_bytes
        read_timeout_s = self.cfg.listen.read_timeout_s
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        path = request.path
        plan = RequestPlan()
        data: Any = None
        doc: Any = None
        planned_api: str | None = None
        if request.method in BODY_METHODS and request.body_exists:
            ctype = request.content_type
            if is_json(ctype) or (  # a JSON endpoint's body is JSON, whatever the client said
                not ctype.startswith("multipart/")
                and any(json_endpoint(u.api, path) for u in self.router.candidates(path))
            ):
                body = await read_limited(request, limit, read_timeout_s)
                data = body
                try:
                    doc = parse_json(body) if body else None
                except ValueError:
                    doc = None
                    if self.router.needs_model(path):
                        raise BadRequest("request body is not valid JSON") from None
                candidates = self.router.candidates(path)
                if doc is not None and candidates:
                    planned_api = candidates[0].api
                    plan = plan_request(planned_api, path, doc)
            else:
                data = counted_body(request, limit, read_timeout_s)
                plan.upload = upload_probe(request.headers.get("Content-Type", ""))
                if plan.upload is not None:
                    data = observed(data, plan.upload)
        upstream = self.router.route(path, plan.model)
        if upstream is None:
            if not self.router.candidates(path):
                raise NotFound(f"no upstream serves {path}")
            raise NotFound(f"model {plan.model!r} is not served here", code="model_not_found")
        if planned_api is not None and upstream.api != planned_api:
            plan = plan_request(upstream.api, path, doc)  # the model chose another API
        if plan.body is not None:
            data = plan.body
        return upstream, plan, data

    def _upstream_headers(
        self, request: web.Request, upstream: UpstreamConfig, rid: str
    ) -> CIMultiDict[str]:
        # the proxy's own keys never go upstream
        drop = REQUEST_DROP_WITH_KEYS if self.identity.keys_required else REQUEST_DROP
        headers = filter_headers(request.headers, drop)
        key = self.upstream_keys.get(upstream.name)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        headers["X-Request-Id"] = rid
        self.tracing.inject(rid, headers)  # HOOK(tracing): traceparent of the request's span
        peer = request.remote
        if peer:
            prior = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        return headers

    def _prompt_estimate(self, plan: RequestPlan, data: Any) -> int:
        if plan.prompt_text:
            return estimate_tokens(plan.prompt_text)
        return len(data) // 4 if isinstance(data, bytes) else 0

    async def _forward(
        self,
        request: web.Request,
        rid: str,
        who: Identity,
        upstream: UpstreamConfig,
        task: str,
        plan: RequestPlan,
        data: Any,
        client_id: str | None = None,
    ) -> web.StreamResponse:
        record = RequestRecord(
            request_id=rid,
            user=who.user,
            team=who.team,
            upstream=upstream.name,
            model=plan.model,
            task=task,
            status=0,
            started_at=utc_now_iso(),
            end_user=plan.end_user,
            key_id=who.key_id,
        )
        if client_id is not None and client_id != rid:
            record.extra["client_request_id"] = client_id  # for the client's own correlation
        self.tracing.start(record, request.headers, request.path)  # HOOK(tracing): span opens
        req = self.accountant.begin(
            record,
            upstream.devices,
            self._prompt_estimate(plan, data),
            plan.stream,
            max_tokens=plan.max_tokens,
            images=plan.images,
        )
        status = 502
        outcome = "ok"
        relay: Relay | None = None
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                resp = await self._send(request, upstream, rid, data)
            except ProxyError as err:
                status = err.status
                outcome = "upstream_timeout" if err.status == 504 else "upstream_unavailable"
                if isinstance(err, PayloadTooLarge):
                    outcome = "payload_too_large"
                elif isinstance(err, RequestTimeout):
                    outcome = "client_timeout"
                return json_error(err, rid, task)
            status = resp.status
            out, relay = await self._start_response(request, resp, rid, task, upstream, plan)
            outcome = await self._relay(resp, out, req, relay)
            if outcome in BROKEN_OFF:
                self._abort(request, upstream, outcome)
            elif outcome == "ok" and status >= 500:
                outcome = "upstream_error"
            return out
        except ConnectionResetError:
            # the client left before the response headers went out; aiohttp drops this quietly
            outcome = "client_disconnect"
            return web.Response(status=status)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away
            outcome = "client_disconnect" if request.transport is None else "cancelled"
            raise
        finally:
            if resp is not None:
                resp.close()
            try:
                usage = self._usage(request.path, upstream, plan, relay, data)
            except Exception as err:
                parser_failed(f"{upstream.api} usage of {request.path}", err)
                usage = Usage()
            record.extra.update(usage.record_fields())
            self.accountant.end(req, status, usage, outcome)

    async def _send(
        self, request: web.Request, upstream: UpstreamConfig, rid: str, data: Any
    ) -> aiohttp.ClientResponse:
        session = self.sessions.get(upstream.name)
        if session is None or session.closed:  # removed by a config reload meanwhile
            raise UpstreamUnavailable(f"upstream {upstream.name!r} is no longer configured")
        url = upstream.url + request.raw_path
        headers = self._upstream_headers(request, upstream, rid)
        first_byte_s = upstream.timeouts.first_byte_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as timer:
                if isinstance(data, AsyncIterator):
                    # the upstream cannot answer a body it has not got: its clock starts once
                    # the body is through (the client's own pace is read_timeout_s's business)
                    timer.reschedule(loop.time() + self.cfg.listen.read_timeout_s + first_byte_s)
                    data = armed_when_sent(data, timer, first_byte_s)
                else:
                    timer.reschedule(loop.time() + first_byte_s)
                resp = await session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                )
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamTimeout(
                f"upstream {upstream.name!r} did not accept a connection within "
                f"{upstream.timeouts.connect_s:g} s"
            ) from None
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {upstream.name!r} did not answer within "
                f"{first_byte_s:g} s (timeouts.first_byte_s)"
            ) from None
        except (PayloadTooLarge, RequestTimeout):
            raise
        except aiohttp.ClientError as e:
            if isinstance(e.__cause__, PayloadTooLarge | RequestTimeout):
                raise e.__cause__ from None  # the client's streamed body broke the limits
            if isinstance(e, aiohttp.ClientConnectorError):
                raise UpstreamUnavailable(
                    f"upstream {upstream.name!r} is unreachable: {e.os_error.strerror or e}"
                ) from None
            raise UpstreamUnavailable(
                f"upstream {upstream.name!r} failed: {type(e).__name__}"
            ) from None
        except OSError as e:
            raise UpstreamUnavailable(
                f"upstream {upstream.name!r} failed: {type(e).__name__}"
            ) from None
        # from here on the upstream's silence is timed between body chunks: aiohttp's read
        # timer, re-armed by every chunk that arrives (the session sets none for the head)
        proto = resp.connection.protocol if resp.connection is not None else None
        if proto is not None:
            proto.read_timeout = upstream.timeouts.idle_s
            proto.start_timeout()
        return resp

    async def _start_response(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        rid: str,
        task: str,
        upstream: UpstreamConfig,
        plan: RequestPlan,
    ) -> tuple[web.StreamResponse, Relay]:
        ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        encoded = resp.headers.get("Content-Encoding", "identity").lower() != "identity"
        parser: StreamUsage | None = None
        collector: BodyUsage | None = None
        if not encoded:
            collect = upstream.name in self.counters
            try:
                parser = for_api(upstream.api).stream(request.path, ctype, plan, collect)
            except Exception as err:
                parser_failed(f"{upstream.api} stream of {request.path}", err)
            if parser is None and is_json(ctype):
                collector = BodyUsage()
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        out.headers.extend(filter_headers(resp.headers, RESPONSE_DROP))
        if resp.content_length is not None and not plan.inject_usage:
            out.content_length = resp.content_length
        out.headers["X-Request-Id"] = rid
        out.headers["X-Wattproxy-Task"] = task
        await out.prepare(request)
        header_usage: Usage | None = None
        try:
            header_usage = for_api(upstream.api).headers(request.path, resp.headers)
        except Exception as err:
            parser_failed(f"{upstream.api} headers of {request.path}", err)
        return out, Relay(parser, collector, header_usage=header_usage)

    async def _relay(
        self,
        resp: aiohttp.ClientResponse,
        out: web.StreamResponse,
        req: OpenRequest,
        relay: Relay,
    ) -> str:
        """Copy the body chunk by chunk; returns the outcome."""
        acc = self.accountant
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
                data = chunk
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

    @staticmethod
    def _abort(request: web.Request, upstream: UpstreamConfig, outcome: str) -> None:
        """The upstream broke off mid-answer: so does the client's connection (as nginx and
        Envoy do), never a clean end that would pass a truncated answer off as whole."""
        why = (
            f"sent nothing for {upstream.timeouts.idle_s:g} s (timeouts.idle_s)"
            if outcome == "upstream_timeout"
            else "broke the connection"
        )
        log.warning(
            "upstream %r %s mid-answer; the client's connection is aborted", upstream.name, why
        )
        if request.transport is not None:
            request.transport.abort()

    def _usage(
        self,
        path: str,
        upstream: UpstreamConfig,
        plan: RequestPlan,
        relay: Relay | None,
        data: Any,
    ) -> Usage:
        usage = Usage()
        counter = self.counters.get(upstream.name)
        if relay is not None and relay.parser is not None:
            usage = relay.parser.finish()
            if usage.tokens_source != "server" and counter is not None and relay.parser.text:
                counted = counter.count(relay.parser.text)
                # each generated chunk held a token at least; bytes a server dropped are not
                # in the text (llama-cpp-python's undecodable tokens)
                if counted >= (usage.completion_tokens or 0):
                    usage.completion_tokens = counted
                    usage.tokens_source = "tokenizer"
        elif relay is not None and relay.collector is not None:
            usage = for_api(upstream.api).body(path, relay.collector.json())
        if relay is not None and relay.header_usage is not None:
            usage.fill_from(relay.header_usage)
        if usage.completion_tokens is None and usage.generated_text is not None:
            if counter is not None:
                usage.completion_tokens = counter.count(usage.generated_text)
                usage.tokens_source = weaker_source(usage.tokens_source, "tokenizer")
            else:
                usage.completion_tokens = estimate_tokens(usage.generated_text)
                usage.tokens_source = weaker_source(usage.tokens_source, "estimate")
        if usage.prompt_tokens == 0 and plan.prompt_text.strip():
            usage.prompt_tokens = None  # a zero count for a prompt is a placeholder: recount
        if usage.prompt_tokens is None and (plan.prompt_text or plan.messages or plan.prompt_parts):
            if counter is not None and plan.prompt_parts:
                usage.prompt_tokens = sum(counter.count_prompt(None, p) for p in plan.prompt_parts)
                usage.tokens_source = weaker_source(usage.tokens_source, "tokenizer")
            elif counter is not None:
                usage.prompt_tokens = counter.count_prompt(plan.messages, plan.prompt_text)
                usage.tokens_source = weaker_source(usage.tokens_source, "tokenizer")
            else:
                usage.prompt_tokens = estimate_tokens(plan.prompt_text)
                usage.tokens_source = weaker_source(usage.tokens_source, "estimate")
        if plan.upload is not None:
            uploaded = plan.upload.finish()
            usage.audio_s = uploaded.audio_s if uploaded.audio_s is not None else usage.audio_s
            usage.model = uploaded.model
        for key, value in plan.extra.items():  # what the request said (image size, steps)
            usage.extra.setdefault(key, value)
        if usage.images is None:
            usage.images = plan.images
        return usage
