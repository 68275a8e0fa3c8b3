"""create_app(): builds every part from the config and wires them into an aiohttp application.

Parts are passed in where tests need their own (meter, ledger, registry, environment);
everything else is built here from the config. What a reload replaces is one ``Runtime``
(``proxy.runtime``, applied by ``proxy.reload``). Startup and shutdown live in ``cleanup_ctx``
so they always pair.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from estimators.attribution import AttributionEngine, IdlePolicy, Weighting
from estimators.carbon import CarbonClock, CarbonConfig, Intensity, build_provider
from estimators.embodied import water_l_per_j
from estimators.errors import EstimatorError
from estimators.estimator import Estimator
from estimators.meters import LoadTracker, Meter, Sampler, SimulatedMeter, build_meter
from proxy.accounting import Accountant
from proxy.background import Background
from proxy.budgets import Budgets
from proxy.config import Config
from proxy.forward import Forwarder
from proxy.health import healthz, readyz_handler
from proxy.identity import IdentityResolver, KeyStore
from proxy.ledger.base import Ledger, open_ledger, redacted_url
from proxy.ledger.spool import Spool
from proxy.ledger.writer import LedgerWriter
from proxy.metrics import Metrics, metrics_handler
from proxy.middleware import error_middleware
from proxy.protocol import handler_args
from proxy.records import RequestRecord
from proxy.reports.api import Emissions, RecentRecords
from proxy.route_policy import RouteState, UpstreamGrids
from proxy.runtime import Live, Runtime, build_runtime, load_counters, load_keys, model_tasks_of
from proxy.sessions import Sessions
from proxy.tokens import TokenCounter
from proxy.tracing import NullTracing, build_tracing

log = logging.getLogger("wattproxy")

#: The logger of the opt-in JSON access log (``log.access_log``): one line per final record.
ACCESS_LOGGER = "wattproxy.access"
#: Seconds the startup check waits for the ledger to answer before warning.
LEDGER_STARTUP_PING_S = 3.0


@dataclass
class Parts:
    """Everything one proxy process runs; reachable from handlers through ``PARTS``. What a
    reload replaces is ``live.runtime``; the rest lives as long as the process."""

    live: Live
    metrics: Metrics
    meter: Meter
    engine: AttributionEngine
    estimator: Estimator
    accountant: Accountant
    ledger: Ledger
    writer: LedgerWriter
    recent: RecentRecords
    sampler: Sampler
    #: the environment the config's ``*_env`` names are read from
    environ: Mapping[str, str]
    sessions: Sessions = field(default_factory=Sessions)
    carbon: CarbonClock | None = None
    background: Background = field(default_factory=Background)
    budgets: Budgets | None = None
    tracing: NullTracing = field(default_factory=NullTracing)
    routes: RouteState | None = None
    #: told of every final record after its span (the workers' hub sends it back to a worker)
    final_hooks: list[Callable[[RequestRecord], None]] = field(default_factory=list)

    @property
    def runtime(self) -> Runtime:
        """The runtime in force."""
        return self.live.runtime


PARTS = web.AppKey("wattproxy_parts", Parts)
FORWARDER = web.AppKey("wattproxy_forwarder", Forwarder)


class CurrentIdentity(IdentityResolver):
    """The identity resolver of the runtime in force, for a part built once that holds its
    resolver for life (the emission endpoints): reloaded keys apply there too."""

    def __init__(self, live: Live) -> None:  # no state of its own: it reads the live one
        self._live = live

    @property
    def keys(self) -> KeyStore | None:
        return self._live.runtime.identity.keys

    @property
    def allow_header_identity(self) -> bool:
        return self._live.runtime.identity.allow_header_identity


def _carbon_clock(
    carbon: CarbonConfig, metrics: Metrics, environ: Mapping[str, str], *, section: bool = True
) -> CarbonClock:
    """The clock of the ``carbon:`` section (``section``: it also sets the provider gauge), or
    of an upstream's own zone (routing): each sets its zone's intensity gauge."""
    provider_name = carbon.provider

    def on_update(intensity: Intensity) -> None:
        metrics.grid_intensity.labels(intensity.zone).set(intensity.g_per_kwh)
        if not section:
            return
        metrics.carbon_provider.clear()
        metrics.carbon_provider.labels(
            provider_name, intensity.zone, str(intensity.fallback).lower()
        ).set(1)

    provider = build_provider(carbon, environ=environ)
    return CarbonClock(provider, carbon.zone, carbon.pue, carbon.refresh_s, on_update=on_update)


def build_estimator(cfg: Config) -> Estimator:
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
        Weighting(cfg.attribution.weighting),
        IdlePolicy(cfg.attribution.idle),
        idle_w,
        embodied_g_per_s={d: e.rate_g_per_s for d, e in cfg.meter.embodied().items()},
    )
    estimator = build_estimator(cfg)
    ledger = (
        ledger if ledger is not None else open_ledger(cfg.ledger.url, cfg.ledger.retention_days)
    )
    carbon = _carbon_clock(cfg.carbon, metrics, env)
    # one for the process's life: a reload reconfigures it, holds of requests in flight stay
    # priced where each request's upstream draws its power (the accountant, made below)
    budgets = Budgets(
        cfg.budgets,
        ledger,
        estimator=estimator,
        g_per_j=lambda upstream: accountant.upstream_g_per_j(upstream),
    )
    writer = LedgerWriter(
        ledger,
        metrics,
        cfg.ledger.batch_size,
        cfg.ledger.flush_interval_ms / 1000.0,
        spool=Spool(cfg.ledger.spool_path, cfg.ledger.spool_max_bytes),
        on_written=budgets.written,
    )
    recent = RecentRecords()
    # sessions are opened and tokenizers loaded at startup (``lifecycle``), in the loop
    counters = {u.name: TokenCounter(u.model_path) for u in cfg.upstreams if u.model_path}
    live = Live(build_runtime(cfg, load_keys(cfg), env, budgets, {}, counters, model_tasks_of(cfg)))

    access_log = logging.getLogger(ACCESS_LOGGER)

    tracing = build_tracing(cfg.tracing)
    final_hooks: list[Callable[[RequestRecord], None]] = []

    def sink(record: RequestRecord) -> None:
        """Where every final record goes: its span, metrics, memory, ledger, access log,
        budgets (and the hooks: the worker that handled it, with several)."""
        tracing.finish(record)  # the span ends with the final record (its trace id on it)
        for hook in final_hooks:
            hook(record)
        metrics.observe_final(record)
        recent.add(record)
        writer.submit(record)
        if live.runtime.cfg.log.access_log:
            access_log.info("%s", json.dumps(record.to_dict(), separators=(",", ":")))
        budgets.observe(record)  # releases its hold; next to nothing when disabled

    meter = meter if meter is not None else build_meter(cfg.meter, load=LoadTracker())
    routes = RouteState(carbon, cfg.carbon, lambda c: _carbon_clock(c, metrics, env, section=False))
    routes.ensure_clocks(cfg.upstreams)  # started with the others (``lifecycle``)
    accountant = Accountant(
        engine,
        estimator,
        sink,
        observer=metrics,
        load=meter.tracker if isinstance(meter, SimulatedMeter) else None,
        meter_devices=meter.devices(),
        meter_kind=meter.kind,
        g_per_j=carbon.g_per_j,
        grid=UpstreamGrids(routes, lambda: live.runtime.cfg.upstreams),
        water_l_per_j=water_l_per_j(
            cfg.carbon.wue_l_per_kwh, cfg.carbon.grid_water_l_per_kwh, cfg.carbon.pue
        ),
    )
    sampler = Sampler(meter, cfg.meter.interval_ms / 1000.0, accountant.on_reading)
    for device in meter.devices():
        metrics.meter_up.labels(device, meter.kind).set(0)
    return Parts(
        live=live,
        metrics=metrics,
        meter=meter,
        engine=engine,
        estimator=estimator,
        accountant=accountant,
        ledger=ledger,
        writer=writer,
        recent=recent,
        sampler=sampler,
        environ=env,
        carbon=carbon,
        budgets=budgets,
        tracing=tracing,
        routes=routes,
        final_hooks=final_hooks,
    )


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    parts = app[PARTS]
    rt = parts.runtime
    await parts.ledger.open()
    await _warn_if_ledger_down(parts.ledger, rt.cfg)
    sessions = {u.name: parts.sessions.open(u) for u in rt.cfg.upstreams}
    counters = await load_counters(rt.counters)
    parts.live.runtime = dataclasses.replace(rt, sessions=sessions, counters=counters)
    bg = parts.background
    await parts.sampler.read_once()  # the baseline reading
    bg.spawn("sampler", parts.sampler.run())
    bg.spawn("ledger-writer", parts.writer.run())
    if parts.carbon is not None:
        bg.spawn("carbon-intensity", parts.carbon.run())
    if parts.routes is not None:
        for clock in parts.routes.extra_clocks():
            bg.spawn(f"carbon-intensity-{clock.zone}", clock.run())
    yield
    await bg.cancel_all()
    if parts.carbon is not None:
        await parts.carbon.provider.close()
    if parts.routes is not None:
        for clock in parts.routes.extra_clocks():
            await clock.provider.close()
    await parts.sessions.close_all()
    await parts.sampler.read_once()  # cover the last requests' ends
    parts.accountant.drain()
    await parts.writer.flush()
    await parts.ledger.close()
    await asyncio.to_thread(parts.meter.close)
    await asyncio.to_thread(parts.tracing.close)  # export the last spans


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


def create_app(cfg: Config, parts: Parts | None = None, **kwargs: object) -> web.Application:
    """The proxy application. ``kwargs`` go to ``build_parts`` (meter, ledger, registry,
    environ)."""
    parts = parts if parts is not None else build_parts(cfg, **kwargs)  # type: ignore[arg-type]
    live = parts.live
    app = web.Application(
        client_max_size=cfg.limits.max_body_bytes,
        handler_args=handler_args(cfg),
        middlewares=[error_middleware(lambda: live.runtime.cfg.identity.trust_request_id)],
    )
    app[PARTS] = parts
    forwarder = Forwarder(
        live,
        parts.sessions,
        parts.accountant,
        parts.metrics,
        tracing=parts.tracing,
        routes=parts.routes,
    )
    app[FORWARDER] = forwarder
    add_accounting_routes(app, cfg, parts)
    app.router.add_route("*", "/{tail:.*}", forwarder.handle)
    app.cleanup_ctx.append(lifecycle)
    return app


def add_accounting_routes(app: web.Application, cfg: Config, parts: Parts) -> None:
    """The routes the accounting parts answer: ``/metrics`` (unless on its own listener),
    ``/healthz``, ``/readyz`` and the emission endpoints. With several workers, the accounting
    process serves them and the workers pass them on (``proxy.workers``)."""
    admin_token = parts.environ.get(cfg.admin_token_env) or None
    emissions = Emissions(
        parts.ledger, parts.accountant, parts.recent, CurrentIdentity(parts.live), admin_token
    )

    async def metrics(request: web.Request) -> web.Response:
        return await metrics_handler(request, parts.metrics)

    if cfg.listen.metrics_port is None:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get(
        "/readyz",
        readyz_handler(parts.live, parts.ledger, parts.writer, parts.meter, parts.sampler),
    )
    app.router.add_get("/v1/emissions/requests/{request_id}", emissions.record)
    app.router.add_get("/v1/emissions/users/{user}", emissions.user_report)
    app.router.add_get("/v1/emissions/summary", emissions.summary)
