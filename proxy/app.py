"""create_app(): builds every part from the config and wires them into an aiohttp application.

Parts are passed in where tests need their own (meter, ledger, registry); everything else is
built here from the config. Startup and shutdown live in ``cleanup_ctx`` so they always pair.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry

from estimators.attribution import AttributionEngine, IdlePolicy, Weighting
from estimators.carbon import CarbonClock, Intensity, build_provider
from estimators.errors import EstimatorError
from estimators.estimator import Estimator
from estimators.meters import Meter, Sampler, build_meter
from estimators.model_card import task_from_model_path
from proxy.accounting import Accountant
from proxy.background import Background
from proxy.budgets import Budgets
from proxy.config import Config, UpstreamConfig
from proxy.errors import ProxyError
from proxy.forward import BudgetCheck, Forwarder, check_framing, check_target, json_error
from proxy.headers import client_request_id, request_id
from proxy.identity import IdentityResolver, KeyStore
from proxy.ledger.base import Ledger, open_ledger, redacted_url
from proxy.ledger.spool import Spool
from proxy.ledger.writer import LedgerWriter
from proxy.metrics import Metrics, metrics_handler
from proxy.records import RequestRecord
from proxy.reports.api import Emissions, RecentRecords
from proxy.routing import Router
from proxy.tokens import TokenCounter
from proxy.tracing import NullTracing, build_tracing

log = logging.getLogger("wattproxy")

#: The logger of the opt-in JSON access log (``log.access_log``): one line per final record.
ACCESS_LOGGER = "wattproxy.access"
#: Seconds a /readyz upstream probe may take.
READY_PROBE_TIMEOUT_S = 1.0
#: Seconds the startup check waits for the ledger to answer before warning.
LEDGER_STARTUP_PING_S = 3.0
#: Bytes of one request header line (name and value) and headers per request; past them the
#: request is refused with 400 before any handler runs (aiohttp's parser enforces both).
MAX_HEADER_FIELD_BYTES = 8190
MAX_HEADERS = 128
#: Config sections a SIGHUP reload does not apply (listeners, meter, ledger...): restart.
RESTART_ONLY = (
    "listen",
    "meter",
    "attribution",
    "carbon",
    "ledger",
    "metrics",
    "admin_token_env",
    "tracing",
)


@dataclass
class Parts:
    """Everything one proxy process runs; reachable from handlers through ``PARTS``."""

    cfg: Config
    metrics: Metrics
    meter: Meter
    engine: AttributionEngine
    estimator: Estimator
    accountant: Accountant
    ledger: Ledger
    writer: LedgerWriter
    recent: RecentRecords
    router: Router
    identity: IdentityResolver
    sampler: Sampler
    counters: dict[str, TokenCounter]
    #: upstream -> the task read from its model_path's config (for routes that fix none)
    model_tasks: dict[str, str] = field(default_factory=dict)
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    carbon: CarbonClock | None = None
    background: Background = field(default_factory=Background)
    budgets: Budgets | None = None
    #: upstream sessions replaced by a reload: requests may still stream through them
    retired_sessions: list[aiohttp.ClientSession] = field(default_factory=list)
    tracing: NullTracing = field(default_factory=NullTracing)  # HOOK(tracing)


PARTS = web.AppKey("wattproxy_parts", Parts)
FORWARDER = web.AppKey("wattproxy_forwarder", Forwarder)


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
    ``listen.read_timeout_s`` it is the slow-loris guard for headers (bodies: ``forward``)."""
    return {
        "keepalive_timeout": cfg.listen.read_timeout_s,
        "max_field_size": MAX_HEADER_FIELD_BYTES,
        "max_line_size": MAX_HEADER_FIELD_BYTES,
        "max_headers": MAX_HEADERS,
        "logger": PeerErrorLog(logging.getLogger("aiohttp.server"), {}),
    }


@web.middleware
async def refuse_foreign_targets(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CONNECT, absolute-form targets, encoded slashes and traversal get a JSON 400 before
    routing: this is a reverse proxy, never an open one."""
    try:
        check_target(request.method, request.raw_path, request.path)
        check_framing(request.headers.get("Transfer-Encoding"))
    except ProxyError as err:
        client_id = client_request_id(request.headers.get("X-Request-Id"))
        trust = request.app[PARTS].cfg.identity.trust_request_id
        resp = json_error(err, request_id(client_id, trust=trust))
        if request.body_exists:
            resp.force_close()  # the unread body must never be taken for the next request
        return resp
    return await handler(request)


def _carbon_clock(cfg: Config, metrics: Metrics, environ: Mapping[str, str]) -> CarbonClock:
    provider_name = cfg.carbon.provider

    def on_update(intensity: Intensity) -> None:
        metrics.grid_intensity.labels(intensity.zone).set(intensity.g_per_kwh)
        metrics.carbon_provider.clear()
        metrics.carbon_provider.labels(
            provider_name, intensity.zone, str(intensity.fallback).lower()
        ).set(1)

    provider = build_provider(cfg.carbon, environ=environ)
    return CarbonClock(
        provider, cfg.carbon.zone, cfg.carbon.pue, cfg.carbon.refresh_s, on_update=on_update
    )


def _model_tasks(cfg: Config) -> dict[str, str]:
    tasks = {}
    for upstream in cfg.upstreams:
        task = task_from_model_path(upstream.model_path) if upstream.model_path else None
        if task is not None:
            tasks[upstream.name] = task
    return tasks


def _estimator(cfg: Config) -> Estimator:
    """The estimator, with the model of every upstream whose ``model_path`` holds a config
    (a folder with only a tokenizer still counts tokens; its estimates use the task priors)."""
    estimator = Estimator()
    for upstream in cfg.upstreams:
        if upstream.model_path:
            try:
                estimator.register_model(upstream.name, model_path=upstream.model_path)
            except EstimatorError as e:
                log.warning(
                    "upstreams.%s.model_path: no model-aware estimate (%s); priors are used",
                    upstream.name,
                    e,
                )
    return estimator


def build_parts(
    cfg: Config,
    *,
    meter: Meter | None = None,
    ledger: Ledger | None = None,
    registry: CollectorRegistry | None = None,
    environ: Mapping[str, str] | None = None,
) -> Parts:
    env = os.environ if environ is None else environ
    metrics = Metrics(
        registry,
        per_user_labels=cfg.metrics.per_user_labels,
        max_user_labels=cfg.metrics.max_user_labels,
    )
    idle_w = None if cfg.attribution.idle_watts == "auto" else float(cfg.attribution.idle_watts)
    engine = AttributionEngine(
        Weighting(cfg.attribution.weighting), IdlePolicy(cfg.attribution.idle), idle_w
    )
    estimator = _estimator(cfg)
    ledger = (
        ledger if ledger is not None else open_ledger(cfg.ledger.url, cfg.ledger.retention_days)
    )
    carbon = _carbon_clock(cfg, metrics, env)
    # one for the process's life: a reload reconfigures it, holds of requests in flight stay
    budgets = Budgets(cfg.budgets, ledger, estimator=estimator, g_per_j=carbon.g_per_j)
    writer = LedgerWriter(
        ledger,
        metrics,
        cfg.ledger.batch_size,
        cfg.ledger.flush_interval_ms / 1000.0,
        spool=Spool(cfg.ledger.spool_path, cfg.ledger.spool_max_bytes),
        on_written=budgets.written,
    )
    recent = RecentRecords()

    access_log = logging.getLogger(ACCESS_LOGGER)
    tracing = build_tracing(cfg.tracing)  # HOOK(tracing)
    current: list[Parts] = []  # set below; read on each record, as a reload swaps parts

    def sink(record: RequestRecord) -> None:
        tracing.finish(record)  # HOOK(tracing): the span ends with the final record
        recent.add(record)
        writer.submit(record)
        live = current[0]
        if live.cfg.log.access_log:
            access_log.info("%s", json.dumps(record.to_dict(), separators=(",", ":")))
        if live.budgets is not None:  # releases its hold; next to nothing when disabled
            live.budgets.observe(record)

    holder: dict[str, Accountant] = {}
    meter = (
        meter
        if meter is not None
        else build_meter(cfg.meter, load=lambda: holder["a"].load() if "a" in holder else {})
    )
    accountant = Accountant(
        engine,
        estimator,
        metrics,
        sink,
        meter_devices=meter.devices(),
        meter_kind=meter.kind,
        g_per_j=carbon.g_per_j,
    )
    holder["a"] = accountant
    sampler = Sampler(meter, cfg.meter.interval_ms / 1000.0, accountant.on_reading)
    keys = KeyStore.load(cfg.identity.keys_file) if cfg.identity.keys_file else None
    identity = IdentityResolver(keys, cfg.identity.allow_header_identity)
    counters = {u.name: TokenCounter(u.model_path) for u in cfg.upstreams if u.model_path}
    parts = Parts(
        cfg=cfg,
        metrics=metrics,
        meter=meter,
        engine=engine,
        estimator=estimator,
        accountant=accountant,
        ledger=ledger,
        writer=writer,
        recent=recent,
        router=Router(cfg.upstreams),
        identity=identity,
        sampler=sampler,
        counters=counters,
        model_tasks=_model_tasks(cfg),
        carbon=carbon,
        budgets=budgets,
        tracing=tracing,  # HOOK(tracing)
    )
    current.append(parts)
    for device in meter.devices():
        metrics.meter_up.labels(device, meter.kind).set(0)
    return parts


async def _load_counters(counters: dict[str, TokenCounter]) -> dict[str, TokenCounter]:
    """Load the tokenizers (off the loop); an upstream whose folder has none usable counts
    tokens from the server or by estimate instead, with a warning."""
    results = await asyncio.gather(
        *(asyncio.to_thread(c.load) for c in counters.values()), return_exceptions=True
    )
    loaded = {}
    for (name, counter), result in zip(counters.items(), results, strict=True):
        if isinstance(result, Exception):
            log.warning(
                "upstreams.%s.model_path: no tokenizer in %s (%s); tokens come from the server "
                "or are estimated",
                name,
                counter.model_path,
                type(result).__name__,
            )
        else:
            loaded[name] = counter
    return loaded


def _client_ssl(upstream: UpstreamConfig) -> ssl.SSLContext | bool:
    if upstream.ca_file:
        return ssl.create_default_context(cafile=upstream.ca_file)
    return True


def _session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    t = upstream.timeouts
    connector = aiohttp.TCPConnector(
        limit=upstream.max_connections, ssl=_client_ssl(upstream), keepalive_timeout=60
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


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    parts = app[PARTS]
    cfg = parts.cfg
    await parts.ledger.open()
    await _warn_if_ledger_down(parts.ledger, cfg)
    for upstream in cfg.upstreams:
        parts.sessions[upstream.name] = _session(upstream)
    loaded = await _load_counters(parts.counters)
    parts.counters.clear()
    parts.counters.update(loaded)
    bg = parts.background
    await parts.sampler.read_once()  # the baseline reading
    bg.spawn("sampler", parts.sampler.run())
    bg.spawn("ledger-writer", parts.writer.run())
    if parts.carbon is not None:
        bg.spawn("carbon-intensity", parts.carbon.run())
    yield
    await bg.cancel_all()
    if parts.carbon is not None:
        await parts.carbon.provider.close()
    for session in [*parts.sessions.values(), *parts.retired_sessions]:
        await session.close()
    await parts.sampler.read_once()  # cover the last requests' ends
    parts.accountant.drain()
    await parts.writer.flush()
    await parts.ledger.close()
    await asyncio.to_thread(parts.meter.close)
    await asyncio.to_thread(parts.tracing.close)  # HOOK(tracing): export the last spans


async def _warn_if_ledger_down(ledger: Ledger, cfg: Config) -> None:
    """Say at startup, not only on /readyz, that the ledger does not answer; the proxy serves
    all the same and the spool keeps the records until it does."""
    try:
        async with asyncio.timeout(LEDGER_STARTUP_PING_S):
            ok = await ledger.ping()
    except Exception:  # a timeout, or anything the backend raised: it is not answering
        ok = False
    if not ok:
        log.warning(
            "ledger %s is unreachable at startup; serving anyway, records are spooled to %s "
            "until it answers (see /readyz)",
            redacted_url(cfg.ledger.url),
            cfg.ledger.spool_path,
        )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _probe(url: str) -> bool:
    parsed = aiohttp.client.URL(url)
    try:
        async with asyncio.timeout(READY_PROBE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(parsed.host, parsed.port)
            writer.close()
        return True
    except (OSError, TimeoutError):
        return False


async def readyz(request: web.Request) -> web.Response:
    parts = request.app[PARTS]
    upstreams = dict(
        zip(
            [u.name for u in parts.cfg.upstreams],
            await asyncio.gather(*(_probe(u.url) for u in parts.cfg.upstreams)),
            strict=True,
        )
    )
    try:
        ledger_ok = await parts.ledger.ping()
    except Exception:
        ledger_ok = False
    devices = parts.meter.devices()
    meter_ok = not devices or parts.sampler.reads > 0
    ready_when = parts.cfg.health.ready_when
    answering = any if ready_when == "any" else all
    ready = answering(upstreams.values()) and ledger_ok
    body = {
        "ready": ready,
        "ready_when": ready_when,
        "upstreams": upstreams,
        "ledger": {
            "backend": parts.ledger.backend,
            "ok": ledger_ok,
            "backlog": parts.writer.backlog,
        },
        "meter": {"kind": parts.meter.kind, "devices": devices, "ok": meter_ok},
    }
    return web.json_response(body, status=200 if ready else 503)


def _budget_check(budgets: Budgets | None) -> BudgetCheck | None:
    return budgets.check if budgets is not None and budgets.enabled else None


def _upstream_keys(cfg: Config) -> dict[str, str]:
    return {u.name: os.environ.get(u.api_key_env, "") for u in cfg.upstreams if u.api_key_env}


async def apply_config(app: web.Application, new: Config) -> list[str]:
    """Apply a reloaded config to the running app: upstreams and routing, identity keys,
    budgets, limits, the access log. Everything is prepared first (sessions, tokenizers, the
    keys file) and then swapped with no await in between, so a request sees the old config or
    the new one, never a mix; requests in flight finish on the upstream they were routed to.

    Returns the changed sections that a reload does not apply (they keep their old values).
    Raises ``ConfigError`` (and changes nothing) when the new keys file cannot be used.
    """
    parts = app[PARTS]
    old = parts.cfg
    held = {name: getattr(old, name) for name in RESTART_ONLY}
    needs_restart = [name for name in RESTART_ONLY if getattr(new, name) != held[name]]
    cfg = new.model_copy(update=held)
    keys = KeyStore.load(cfg.identity.keys_file) if cfg.identity.keys_file else None
    before = {u.name: u for u in old.upstreams}
    sessions: dict[str, aiohttp.ClientSession] = {}
    for upstream in cfg.upstreams:
        prior = parts.sessions.get(upstream.name)
        same = before.get(upstream.name) == upstream
        sessions[upstream.name] = prior if prior is not None and same else _session(upstream)
    counters: dict[str, TokenCounter] = {}
    for upstream in cfg.upstreams:
        if not upstream.model_path:
            continue
        counter = parts.counters.get(upstream.name)
        if counter is None or before[upstream.name].model_path != upstream.model_path:
            counter = TokenCounter(upstream.model_path)
        counters[upstream.name] = counter
    counters = await _load_counters(counters)
    model_tasks = await asyncio.to_thread(_model_tasks, cfg)
    budgets = parts.budgets
    # -- the swap: no await from here on --------------------------------------------------
    parts.retired_sessions.extend(s for n, s in parts.sessions.items() if sessions.get(n) is not s)
    parts.cfg = cfg
    parts.sessions = sessions
    parts.router = Router(cfg.upstreams)
    parts.counters.clear()
    parts.counters.update(counters)
    parts.model_tasks.clear()
    parts.model_tasks.update(model_tasks)
    parts.identity.keys = keys
    parts.identity.allow_header_identity = cfg.identity.allow_header_identity
    if budgets is not None:
        budgets.reconfigure(cfg.budgets)
    app[FORWARDER].reconfigure(
        cfg, parts.router, sessions, _budget_check(budgets), _upstream_keys(cfg)
    )
    return needs_restart


def create_app(cfg: Config, parts: Parts | None = None, **kwargs: object) -> web.Application:
    """The proxy application. ``kwargs`` go to ``build_parts`` (meter, ledger, registry)."""
    parts = parts if parts is not None else build_parts(cfg, **kwargs)  # type: ignore[arg-type]
    app = web.Application(
        client_max_size=cfg.limits.max_body_bytes,
        handler_args=handler_args(cfg),
        middlewares=[refuse_foreign_targets],
    )
    app[PARTS] = parts
    admin_token = os.environ.get(cfg.admin_token_env) or None
    emissions = Emissions(parts.ledger, parts.accountant, parts.recent, parts.identity, admin_token)
    forwarder = Forwarder(
        cfg,
        parts.router,
        parts.sessions,
        parts.accountant,
        parts.identity,
        parts.metrics,
        counters=parts.counters,
        model_tasks=parts.model_tasks,
        budget_check=_budget_check(parts.budgets),
        upstream_keys=_upstream_keys(cfg),
        tracing=parts.tracing,  # HOOK(tracing)
    )
    app[FORWARDER] = forwarder

    async def metrics(request: web.Request) -> web.Response:
        return await metrics_handler(request, parts.metrics)

    if cfg.listen.metrics_port is None:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/emissions/requests/{request_id}", emissions.record)
    app.router.add_get("/v1/emissions/users/{user}", emissions.user_report)
    app.router.add_get("/v1/emissions/summary", emissions.summary)
    app.router.add_route("*", "/{tail:.*}", forwarder.handle)
    app.cleanup_ctx.append(_lifecycle)
    return app
