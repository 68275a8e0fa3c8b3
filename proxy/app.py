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

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from estimators.attribution import AttributionEngine, IdlePolicy, Weighting
from estimators.carbon import CarbonClock, Intensity, build_provider
from estimators.errors import EstimatorError
from estimators.estimator import Estimator
from estimators.meters.base import Meter
from estimators.meters.factory import build_meter
from estimators.sampler import Sampler
from proxy.accounting import Accountant
from proxy.background import Background
from proxy.budgets import Budgets
from proxy.config import Config, UpstreamConfig
from proxy.emissions import Emissions, RecentRecords
from proxy.errors import ConfigError
from proxy.forward import Forwarder
from proxy.identity import IdentityResolver, KeyStore
from proxy.ledger.base import Ledger, open_ledger
from proxy.ledger.spool import Spool
from proxy.ledger.writer import LedgerWriter
from proxy.metrics import Metrics, metrics_handler
from proxy.records import RequestRecord
from proxy.routing import Router
from proxy.tokens import TokenCounter

log = logging.getLogger("wattproxy")

#: The logger of the opt-in JSON access log (``log.access_log``): one line per final record.
ACCESS_LOGGER = "wattproxy.access"
#: Seconds a /readyz upstream probe may take.
READY_PROBE_TIMEOUT_S = 1.0


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
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    carbon: CarbonClock | None = None
    background: Background = field(default_factory=Background)
    budgets: Budgets | None = None


PARTS = web.AppKey("wattproxy_parts", Parts)


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


def _estimator(cfg: Config) -> Estimator:
    estimator = Estimator()
    for upstream in cfg.upstreams:
        if upstream.model_path:
            try:
                estimator.register_model(upstream.name, model_path=upstream.model_path)
            except EstimatorError as e:
                raise ConfigError([f"upstreams.{upstream.name}.model_path: {e}"]) from e
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
    estimator = Estimator()
    ledger = (
        ledger if ledger is not None else open_ledger(cfg.ledger.url, cfg.ledger.retention_days)
    )
    writer = LedgerWriter(
        ledger,
        metrics,
        cfg.ledger.batch_size,
        cfg.ledger.flush_interval_ms / 1000.0,
        spool=Spool(cfg.ledger.spool_path, cfg.ledger.spool_max_bytes),
    )
    recent = RecentRecords()
    budgets = Budgets(cfg.budgets, ledger)

    access_log = logging.getLogger(ACCESS_LOGGER) if cfg.log.access_log else None

    def sink(record: RequestRecord) -> None:
        recent.add(record)
        writer.submit(record)
        if access_log is not None:
            access_log.info("%s", json.dumps(record.to_dict(), separators=(",", ":")))
        if budgets.enabled:
            budgets.observe(record)

    holder: dict[str, Accountant] = {}
    meter = (
        meter
        if meter is not None
        else build_meter(cfg.meter, load=lambda: holder["a"].load() if "a" in holder else {})
    )
    carbon = _carbon_clock(cfg, metrics, env)
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
        carbon=carbon,
        budgets=budgets,
    )
    for device in meter.devices():
        metrics.meter_up.labels(device, meter.kind).set(0)
    return parts


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
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.idle_s),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    parts = app[PARTS]
    cfg = parts.cfg
    await parts.ledger.open()
    for upstream in cfg.upstreams:
        parts.sessions[upstream.name] = _session(upstream)
    if parts.counters:
        await asyncio.gather(*(asyncio.to_thread(c.load) for c in parts.counters.values()))
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
    for session in parts.sessions.values():
        await session.close()
    await parts.sampler.read_once()  # cover the last requests' ends
    parts.accountant.drain()
    await parts.writer.flush()
    await parts.ledger.close()
    await asyncio.to_thread(parts.meter.close)


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
    ready = all(upstreams.values()) and ledger_ok
    body = {
        "ready": ready,
        "upstreams": upstreams,
        "ledger": {
            "backend": parts.ledger.backend,
            "ok": ledger_ok,
            "backlog": parts.writer.backlog,
        },
        "meter": {"kind": parts.meter.kind, "devices": devices, "ok": meter_ok},
    }
    return web.json_response(body, status=200 if ready else 503)


def create_app(cfg: Config, parts: Parts | None = None, **kwargs: object) -> web.Application:
    """The proxy application. ``kwargs`` go to ``build_parts`` (meter, ledger, registry)."""
    parts = parts if parts is not None else build_parts(cfg, **kwargs)  # type: ignore[arg-type]
    app = web.Application(client_max_size=cfg.limits.max_body_bytes)
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
        budget_check=(
            parts.budgets.check if parts.budgets is not None and parts.budgets.enabled else None
        ),
        upstream_keys={
            u.name: os.environ.get(u.api_key_env, "") for u in cfg.upstreams if u.api_key_env
        },
    )

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
