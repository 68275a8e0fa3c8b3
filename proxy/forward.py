"""The proxy handler: identify the caller, read and route the request, check its budget, send
it upstream, relay the answer (``proxy.streaming``) and account for the request - whatever
happens to either peer on the way. Errors are raised, and rendered by ``proxy.middleware``.

aiohttp client errors are translated to ``proxy.errors`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from estimators.carbon import deferral_s
from estimators.estimator import RequestShape
from proxy import energy_answer
from proxy.accounting import Accounts
from proxy.bodies import BODY_METHODS, armed_when_sent, body_chunks, is_json, observed, read_limited
from proxy.config import UpstreamConfig
from proxy.errors import (
    BadRequest,
    BudgetExceeded,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.headers import REQUEST_DROP, client_request_id, filter_headers, request_id
from proxy.identity import Identity
from proxy.records import RequestRecord, utc_now_iso
from proxy.route_policy import RouteState, is_active
from proxy.runtime import Live, Runtime
from proxy.sessions import Sessions, UpstreamSession
from proxy.streaming import (
    BROKEN_OFF,
    Relay,
    abort_client,
    parser_failed,
    relay_body,
    start_response,
)
from proxy.tasks import OTHER, task_for
from proxy.tracing import NullTracing
from proxy.usage import for_api, json_endpoint, upload_probe
from proxy.usage.base import RequestPlan, Usage, parse_json
from proxy.usage.resolve import prompt_estimate, resolve_usage

#: Request headers not sent upstream when clients authenticate to the proxy with its own keys.
REQUEST_DROP_WITH_KEYS = REQUEST_DROP | {"authorization", "x-api-key"}


def plan_request(api: str, path: str, doc: Any) -> RequestPlan:
    """The API's plan for a JSON request body; if its parser fails, the body goes untouched,
    routed by its ``model`` alone."""
    try:
        return for_api(api).plan(path, doc)
    except Exception as err:
        parser_failed(f"{api} request to {path}", err)
        return for_api("generic").plan(path, doc)


class Counters(Protocol):
    """The decisions the handler counts itself (``proxy.metrics.Metrics``; a worker process
    sends them to the accounting process)."""

    def route_decision(self, upstream: str, reason: str) -> None: ...

    def budget_rejection(self, scope: str) -> None: ...

    def overload_refusal(self) -> None: ...


class Forwarder:
    """The catch-all route's handler.

    Args:
        live: the runtime in force (config, router, sessions, keys, budgets...).
        sessions: the upstream sessions' book (who uses which, retired ones).
        accountant: opens and closes every forwarded request's record.
        counters: routing decisions and budget rejections (the accountant reports the rest).
    """

    def __init__(
        self,
        live: Live,
        sessions: Sessions,
        accountant: Accounts,
        counters: Counters,
        tracing: NullTracing | None = None,
        routes: RouteState | None = None,
    ) -> None:
        self.live = live
        #: carbon/energy-aware routing's state (None: ``Router.route`` alone decides)
        self.routes = routes
        self.sessions = sessions
        self.accountant = accountant
        self.counters = counters
        self.tracing = tracing or NullTracing()
        #: trusted client ids being handled, before the accountant holds them (budget, body)
        self._claimed: set[str] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rt = self.live.runtime
        client_id = client_request_id(request.headers.get("X-Request-Id"))
        rid = request_id(
            client_id, trust=rt.cfg.identity.trust_request_id, in_flight=self.in_flight
        )
        claimed = rid == client_id  # only a client's id can come twice: held until accounted
        if claimed:
            self._claimed.add(rid)
        task: str | None = None
        routed: str | None = None  # the upstream counted in flight, for routing
        try:  # the target was checked by the app's middleware (check_target)
            try:
                self.accountant.admit()
            except Overloaded:
                self.counters.overload_refusal()
                raise
            who = rt.identity.resolve(request.headers)
            upstream, plan, data, reason = await self._read_and_route(request, rt)
            deferred_s = None  # deferral off (the default): not even a coroutine made
            if rt.cfg.routing.max_deferral_s > 0:
                deferred_s = await self._defer(request, rt, upstream, who)
            if reason is not None and self.routes is not None:
                self.counters.route_decision(upstream.name, reason)
                self.routes.begin(upstream.name)
                routed = upstream.name
            task = task_for(
                request.path,
                upstream.tasks,
                upstream.api,
                model_task=rt.model_tasks.get(upstream.name),
                method=request.method,
            )
            if rt.budget_check is not None and task != OTHER:
                shape = RequestShape(
                    upstream.name,
                    plan.model,
                    task,
                    prompt_tokens=prompt_estimate(plan, data),
                    completion_tokens=plan.max_tokens,
                    images=plan.images,
                )
                try:
                    await rt.budget_check(who, rid, shape)
                except BudgetExceeded as err:
                    self.counters.budget_rejection(err.extra.get("scope", "user"))
                    raise
            return await self._forward(
                request, rt, rid, who, upstream, task, plan, data, client_id, reason, deferred_s
            )
        except ProxyError as err:  # rendered by the middleware, with these
            err.request_id, err.task = rid, task
            raise
        finally:
            if claimed:
                self._claimed.discard(rid)
            if routed is not None and self.routes is not None:
                self.routes.end(routed)

    async def _defer(
        self, request: web.Request, rt: Runtime, upstream: UpstreamConfig, who: Identity
    ) -> float | None:
        """Wait, when the request allows it (``X-Wattproxy-Deferrable: <seconds>``, else its
        key's ``deferrable_s``) and ``routing.max_deferral_s`` is on, for the lowest forecast
        intensity window of the upstream's zone that starts within the smaller of the two; the
        seconds waited, or None when deferral does not apply. A provider without a forecast
        means no wait; the forecast's own fetch counts towards the bound."""
        max_s = rt.cfg.routing.max_deferral_s
        raw = request.headers.get("X-Wattproxy-Deferrable")
        if max_s <= 0 or self.routes is None or (raw is None and who.deferrable_s is None):
            return None
        if raw is None:
            asked_s = who.deferrable_s or 0.0
        else:
            try:
                asked_s = float(raw)
            except ValueError:
                asked_s = -1.0
        if not math.isfinite(asked_s) or asked_s < 0:
            raise BadRequest(f"X-Wattproxy-Deferrable must be seconds >= 0, got {raw!r:.40}")
        bound_s = min(asked_s, max_s)
        clock = self.routes.clock(upstream)
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        now = datetime.now(UTC)
        try:
            async with asyncio.timeout(bound_s):
                forecast = await clock.forecast(now)
        except TimeoutError:
            forecast = None
        if not forecast:
            return 0.0
        wait_s = deferral_s(clock.intensity.g_per_kwh, now, forecast, bound_s)
        wait_s = max(0.0, wait_s - (loop.time() - started_s))
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        return wait_s

    def in_flight(self, rid: str) -> bool:
        """A request with this id is being handled or accounted for (until its record is final)."""
        return rid in self._claimed or rid in self.accountant.requests

    async def _read_and_route(
        self, request: web.Request, rt: Runtime
    ) -> tuple[UpstreamConfig, RequestPlan, Any, str | None]:
        """The request's upstream, plan and body, and the routing policy's reason (None when
        routing weighs nothing: ``Router.route`` decided)."""
        limit = rt.cfg.limits.max_body_bytes
        read_timeout_s = rt.cfg.listen.read_timeout_s
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        router = rt.router
        path = request.path
        plan = RequestPlan()
        data: Any = None
        doc: Any = None
        planned_api: str | None = None
        if request.method in BODY_METHODS and request.body_exists:
            ctype = request.content_type
            if is_json(ctype) or (  # a JSON endpoint's body is JSON, whatever the client said
                not ctype.startswith("multipart/")
                and any(json_endpoint(u.api, path) for u in router.candidates(path))
            ):
                body = await read_limited(request, limit, read_timeout_s)
                data = body
                try:
                    doc = parse_json(body) if body else None
                except ValueError:
                    doc = None
                    if router.needs_model(path):
                        raise BadRequest("request body is not valid JSON") from None
                candidates = router.candidates(path)
                if doc is not None and candidates:
                    planned_api = candidates[0].api
                    plan = plan_request(planned_api, path, doc)
            else:
                data = body_chunks(request, limit, read_timeout_s)
                plan.upload = upload_probe(request.headers.get("Content-Type", ""))
                if plan.upload is not None:
                    data = observed(data, plan.upload)
        reason: str | None = None
        if self.routes is not None and is_active(rt.cfg.routing):
            serving = router.serving(path, plan.model)
            upstream = None
            if serving:
                upstream, reason = self.routes.decide(
                    rt.cfg,
                    serving,
                    self.accountant.estimator,
                    plan,
                    data,
                    path,
                    request.method,
                    rt.model_tasks,
                )
        else:
            upstream = router.route(path, plan.model)
        if upstream is None:
            if not router.candidates(path):
                raise NotFound(f"no upstream serves {path}")
            raise NotFound(f"model {plan.model!r} is not served here", code="model_not_found")
        if planned_api is not None and upstream.api != planned_api:
            plan = plan_request(upstream.api, path, doc)  # the model chose another API
        if plan.body is not None:
            data = plan.body
        return upstream, plan, data, reason

    def _upstream_headers(
        self, request: web.Request, rt: Runtime, upstream: UpstreamConfig, rid: str
    ) -> CIMultiDict[str]:
        # the proxy's own keys never go upstream
        drop = REQUEST_DROP_WITH_KEYS if rt.identity.keys_required else REQUEST_DROP
        headers = filter_headers(request.headers, drop)
        key = rt.upstream_keys.get(upstream.name)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        headers["X-Request-Id"] = rid
        self.tracing.inject(rid, headers)  # the traceparent of the request's span
        peer = request.remote
        if peer:
            prior = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        return headers

    async def _forward(
        self,
        request: web.Request,
        rt: Runtime,
        rid: str,
        who: Identity,
        upstream: UpstreamConfig,
        task: str,
        plan: RequestPlan,
        data: Any,
        client_id: str | None = None,
        route_reason: str | None = None,
        deferred_s: float | None = None,
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
        added: dict[str, str] = {}  # response headers of routing and deferral
        if route_reason is not None:
            record.extra["route_reason"] = route_reason
            added["X-Wattproxy-Route-Reason"] = route_reason
        if deferred_s is not None:
            record.extra["deferred_s"] = round(deferred_s, 3)
            added["X-Wattproxy-Deferred-S"] = f"{deferred_s:.3f}"
        self.tracing.start(record, request.headers, request.path)  # the request's span opens
        req = self.accountant.begin(
            record,
            upstream.devices,
            prompt_estimate(plan, data),
            plan.stream,
            max_tokens=plan.max_tokens,
            images=plan.images,
        )
        # energy in the answer, when asked for (docs/energy-in-answer.md)
        plan.energy = energy_answer.figures_for(
            rt.cfg.response.energy_in_usage, request.headers, self.accountant, req
        )
        status = 502
        outcome = "ok"
        relay: Relay | None = None
        resp: aiohttp.ClientResponse | None = None
        lease: UpstreamSession | None = None
        try:
            try:
                lease = self._lease(upstream)
                if route_reason is not None and self.routes is not None:
                    loop = asyncio.get_running_loop()
                    sent_s = loop.time()
                    resp = await self._send(request, rt, lease, upstream, rid, data)
                    self.routes.first_byte(
                        upstream.name, loop.time() - sent_s, rt.cfg.routing.first_byte_window
                    )
                else:
                    resp = await self._send(request, rt, lease, upstream, rid, data)
            except ProxyError as err:
                status, outcome = err.status, err.outcome
                raise
            status = req.record.status = resp.status  # known to the accounting from its 1st byte
            out, relay = await start_response(
                request,
                resp,
                rid,
                task,
                upstream.api,
                plan,
                upstream.name in rt.counters,
                added,
            )
            outcome = await relay_body(resp, out, self.accountant, req, relay)
            if outcome in BROKEN_OFF:
                abort_client(request, upstream, outcome)
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
            if lease is not None:
                self.sessions.release(lease)
            counter = rt.counters.get(upstream.name)
            try:
                if relay is not None:
                    usage = relay.usage(upstream.api, request.path, plan, counter)
                else:
                    usage = resolve_usage(upstream.api, request.path, plan, counter)
            except Exception as err:
                parser_failed(f"{upstream.api} usage of {request.path}", err)
                usage = Usage()
            record.extra.update(usage.record_fields())
            self.accountant.end(req, status, usage, outcome)

    def _lease(self, upstream: UpstreamConfig) -> UpstreamSession:
        """The session of ``upstream`` in the runtime in force now (a reload may have replaced
        it since the request started), held until the answer is relayed."""
        us = self.live.runtime.sessions.get(upstream.name)
        if us is None or us.session.closed:  # removed by a config reload meanwhile
            raise UpstreamUnavailable(f"upstream {upstream.name!r} is no longer configured")
        self.sessions.acquire(us)
        return us

    async def _send(
        self,
        request: web.Request,
        rt: Runtime,
        lease: UpstreamSession,
        upstream: UpstreamConfig,
        rid: str,
        data: Any,
    ) -> aiohttp.ClientResponse:
        url = upstream.url + request.raw_path
        headers = self._upstream_headers(request, rt, upstream, rid)
        first_byte_s = upstream.timeouts.first_byte_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as timer:
                if isinstance(data, AsyncIterator):
                    # the upstream cannot answer a body it has not got: its clock starts once
                    # the body is through (the client's own pace is read_timeout_s's business)
                    timer.reschedule(loop.time() + rt.cfg.listen.read_timeout_s + first_byte_s)
                    data = armed_when_sent(data, timer, first_byte_s)
                else:
                    timer.reschedule(loop.time() + first_byte_s)
                resp = await lease.session.request(
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
