"""The Prometheus metric families of the SPEC, in base units, on a registry passed in.

Labels that come from clients (model names, users) are capped so no client can grow the series
without bound: past the cap a value is reported as ``_other``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest

from proxy.tasks import OTHER as OTHER_TASK
from proxy.tracing import exemplar

if TYPE_CHECKING:
    from estimators.attribution import SampleOutcome
    from proxy.records import RequestRecord

OTHER = "_other"

#: The families of the SPEC, by the names Prometheus shows (counters gain ``_total``).
SPEC_FAMILIES = (
    "wattproxy_requests_total",
    "wattproxy_request_duration_seconds",
    "wattproxy_time_to_first_byte_seconds",
    "wattproxy_tokens_total",
    "wattproxy_energy_joules_total",
    "wattproxy_co2e_grams_total",
    "wattproxy_request_energy_joules",
    "wattproxy_device_energy_joules_total",
    "wattproxy_unattributed_energy_joules_total",
    "wattproxy_device_power_watts",
    "wattproxy_grid_carbon_intensity_grams_per_kwh",
    "wattproxy_inflight_requests",
    "wattproxy_meter_up",
    "wattproxy_ledger_errors_total",
    "wattproxy_ledger_backlog_records",
    "wattproxy_budget_rejections_total",
)

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFB_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ENERGY_BUCKETS_J = (0.1, 0.5, 1, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000)
RELATIVE_ERROR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class LabelCap:
    """Admits the first ``limit`` distinct values of a label; later ones become ``_other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        v = value or ""
        if v in self._seen:
            return v
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(v)
                return v
        return OTHER


class RequestSeries:
    """The labelled children one (upstream, model, task) touches at the end of a request,
    looked up once: ``labels()`` costs about 2 µs a call."""

    __slots__ = (
        "_codes",
        "_labels",
        "_requests",
        "completion_tokens",
        "duration",
        "prompt_tokens",
        "ttfb",
    )

    def __init__(self, m: Metrics, upstream: str, model: str, task: str) -> None:
        self._requests = m.requests
        self._labels = (upstream, model, task)
        self._codes: dict[str, Counter] = {}
        self.duration: Histogram = m.duration.labels(upstream, task)
        self.ttfb: Histogram = m.ttfb.labels(upstream, task)
        self.prompt_tokens: Counter = m.tokens.labels(upstream, model, task, "prompt")
        self.completion_tokens: Counter = m.tokens.labels(upstream, model, task, "completion")

    def requests(self, code: str) -> Counter:
        """``wattproxy_requests_total`` for this series and ``code`` (status codes are few)."""
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._requests.labels(*self._labels, code)
        return child


class Metrics:
    """Every wattproxy metric family.

    Args:
        registry: where to register (a fresh ``CollectorRegistry`` in tests).
        per_user_labels: add a ``user`` label to the energy and CO2e counters.
        max_user_labels: users with their own label; the rest are ``_other``.
        max_model_labels: distinct ``model`` label values before ``_other``.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        per_user_labels: bool = False,
        max_user_labels: int = 50,
        max_model_labels: int = 200,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.per_user_labels = per_user_labels
        self.user_label = LabelCap(max_user_labels)
        self.model_label = LabelCap(max_model_labels)
        user = ("user",) if per_user_labels else ()
        self.requests = Counter(
            "wattproxy_requests",
            "Requests proxied, by the status code the client got.",
            ("upstream", "model", "task", "code"),
            registry=r,
        )
        self.duration = Histogram(
            "wattproxy_request_duration_seconds",
            "Request duration through the proxy.",
            ("upstream", "task"),
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.ttfb = Histogram(
            "wattproxy_time_to_first_byte_seconds",
            "Time to the first response byte.",
            ("upstream", "task"),
            buckets=TTFB_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter(
            "wattproxy_tokens",
            "Tokens processed, by type (prompt, completion).",
            ("upstream", "model", "task", "type"),
            registry=r,
        )
        self.energy = Counter(
            "wattproxy_energy_joules",
            "Energy of finished requests, measured or estimated.",
            ("upstream", "model", "task", "source", *user),
            registry=r,
        )
        self.co2e = Counter(
            "wattproxy_co2e_grams",
            "Grams CO2e of finished requests, measured or estimated.",
            ("upstream", "model", "task", "source", *user),
            registry=r,
        )
        self.request_energy = Histogram(
            "wattproxy_request_energy_joules",
            "Energy per finished request.",
            ("task",),
            buckets=ENERGY_BUCKETS_J,
            registry=r,
        )
        self.device_energy = Counter(
            "wattproxy_device_energy_joules",
            "Energy the meter measured on each device.",
            ("device",),
            registry=r,
        )
        self.attributed_energy = Counter(
            "wattproxy_attributed_energy_joules",
            "Measured device energy charged to requests (device = attributed + unattributed).",
            ("device",),
            registry=r,
        )
        self.unattributed_energy = Counter(
            "wattproxy_unattributed_energy_joules",
            "Measured device energy charged to no request: idle power, or no request in flight.",
            ("device", "reason"),
            registry=r,
        )
        self.embodied = Counter(
            "wattproxy_embodied_co2e_grams",
            "Embodied (manufacturing) grams CO2e of finished requests, by their device time.",
            ("upstream", "model", "task"),
            registry=r,
        )
        self.device_embodied = Counter(
            "wattproxy_device_embodied_co2e_grams",
            "Embodied grams CO2e of each device's sampled time (= attributed + unattributed).",
            ("device",),
            registry=r,
        )
        self.unattributed_embodied = Counter(
            "wattproxy_unattributed_embodied_co2e_grams",
            "Embodied grams CO2e of device time no request was in flight.",
            ("device",),
            registry=r,
        )
        self.water = Counter(
            "wattproxy_water_litres",
            "Litres of water (on-site WUE and the grid's) of finished requests.",
            ("upstream", "model", "task"),
            registry=r,
        )
        self.device_power = Gauge(
            "wattproxy_device_power_watts", "Latest device power.", ("device",), registry=r
        )
        self.grid_intensity = Gauge(
            "wattproxy_grid_carbon_intensity_grams_per_kwh",
            "Grid carbon intensity applied to energy drawn now.",
            ("zone",),
            registry=r,
        )
        self.carbon_provider = Gauge(
            "wattproxy_carbon_provider_info",
            "The carbon-intensity provider in use (1) and whether it fell back to the table.",
            ("provider", "zone", "fallback"),
            registry=r,
        )
        self.inflight = Gauge(
            "wattproxy_inflight_requests", "Requests in flight.", ("upstream",), registry=r
        )
        self.meter_up = Gauge(
            "wattproxy_meter_up",
            "1 when the device's last read succeeded.",
            ("device", "kind"),
            registry=r,
        )
        self.ledger_errors = Counter(
            "wattproxy_ledger_errors",
            "Ledger writes that failed (records then spooled).",
            ("backend",),
            registry=r,
        )
        self.ledger_backlog = Gauge(
            "wattproxy_ledger_backlog_records",
            "Records waiting to reach the ledger.",
            ("backend",),
            registry=r,
        )
        self.outcomes = Counter(
            "wattproxy_request_outcomes",
            "Requests by how they ended: ok, upstream_error (a 5xx answer), upstream_reset, "
            "upstream_timeout, upstream_unavailable, client_disconnect, client_timeout...",
            ("upstream", "outcome"),
            registry=r,
        )
        self.route_decisions = Counter(
            "wattproxy_route_decisions",
            "Routing decisions under routing.policy (or its limits), by the upstream chosen and "
            "why: only, first, least_carbon, least_energy, skipped_busy:<name>, "
            "skipped_slow:<name>, all_busy.",
            ("upstream", "reason"),
            registry=r,
        )
        self.overload_refusals = Counter(
            "wattproxy_overloaded_requests",
            "Requests refused 503 overloaded_error (listen.workers > 1): a worker's events waited "
            "past listen.max_event_backlog_bytes for the accounting process.",
            registry=r,
        )
        self.budget_rejections = Counter(
            "wattproxy_budget_rejections",
            "Requests refused for an exhausted carbon budget.",
            ("scope",),
            registry=r,
        )
        self.worker_restarts = Counter(
            "wattproxy_worker_restarts",
            "Worker processes (listen.workers > 1) started again after exiting unasked; their "
            "requests in flight are recorded with outcome proxy_restart.",
            registry=r,
        )
        self.estimator_error = Histogram(
            "wattproxy_estimator_relative_error",
            "|estimate - measured| / measured of the calibrated estimator, before each update.",
            buckets=RELATIVE_ERROR_BUCKETS,
            registry=r,
        )

        # labelled children by label values; bounded as the labels are (upstreams and tasks come
        # from the config, models and users are capped, status codes and sources are few)
        self._inflight: dict[str, Gauge] = {}
        self._series: dict[tuple[str, str, str], RequestSeries] = {}
        self._energy: dict[tuple[str, ...], tuple[Counter, Counter]] = {}
        self._outcomes: dict[tuple[str, str], Counter] = {}

    def energy_labels(
        self, upstream: str, model: str | None, task: str, source: str, user: str
    ) -> tuple[str, ...]:
        base = (upstream, self.model_label(model), task, source)
        return (*base, self.user_label(user)) if self.per_user_labels else base

    def outcome_for(self, upstream: str, outcome: str) -> Counter:
        key = (upstream, outcome)
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = self.outcomes.labels(upstream, outcome)
        return child

    def inflight_for(self, upstream: str) -> Gauge:
        """``wattproxy_inflight_requests`` of ``upstream``."""
        child = self._inflight.get(upstream)
        if child is None:
            child = self._inflight[upstream] = self.inflight.labels(upstream)
        return child

    def series(self, upstream: str, model: str, task: str) -> RequestSeries:
        """The per-request children of (upstream, model, task); ``model`` already capped."""
        key = (upstream, model, task)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = RequestSeries(self, upstream, model, task)
        return s

    def energy_for(
        self, upstream: str, model: str | None, task: str, source: str, user: str
    ) -> tuple[Counter, Counter]:
        """The ``wattproxy_energy_joules_total`` and ``wattproxy_co2e_grams_total`` children of
        a finished request (labels as ``energy_labels`` gives them)."""
        labels = self.energy_labels(upstream, model, task, source, user)
        pair = self._energy.get(labels)
        if pair is None:
            pair = self._energy[labels] = (self.energy.labels(*labels), self.co2e.labels(*labels))
        return pair

    # -- decisions the request path counts (in a worker process: sent to the accounting one) --

    def route_decision(self, upstream: str, reason: str) -> None:
        self.route_decisions.labels(upstream, reason).inc()

    def budget_rejection(self, scope: str) -> None:
        self.budget_rejections.labels(scope).inc()

    def overload_refusal(self) -> None:
        self.overload_refusals.inc()

    # -- observers: the accountant hands records and readings here, the sink final records ----

    def observe_start(self, record: RequestRecord) -> None:
        """A request was opened: one more in flight on its upstream."""
        self.inflight_for(record.upstream).inc()

    def observe_end(self, record: RequestRecord) -> None:
        """A request ended (status, outcome, timings and tokens set; energy not yet known)."""
        self.inflight_for(record.upstream).dec()
        series = self.series(record.upstream, self.model_label(record.model), record.task)
        series.requests(str(record.status)).inc()
        self.outcome_for(record.upstream, record.outcome).inc()
        if record.duration_s is not None:
            series.duration.observe(record.duration_s)
        if record.ttfb_s is not None:
            series.ttfb.observe(record.ttfb_s)
        if record.prompt_tokens:
            series.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens:
            series.completion_tokens.inc(record.completion_tokens)

    def observe_final(self, record: RequestRecord) -> None:
        """A record turned final: its energy and CO2e are counted."""
        energy, co2e = self.energy_for(
            record.upstream, record.model, record.task, record.source, record.user
        )
        energy.inc(record.energy_j)
        co2e.inc(record.co2e_g)
        if record.embodied_co2e_g is not None or record.water_l is not None:
            labels = (record.upstream, self.model_label(record.model), record.task)
            if record.embodied_co2e_g is not None:
                self.embodied.labels(*labels).inc(record.embodied_co2e_g)
            if record.water_l is not None:
                self.water.labels(*labels).inc(record.water_l)
        if record.task != OTHER_TASK:
            # the trace id as exemplar (rendered in OpenMetrics only)
            self.request_energy.labels(record.task).observe(record.energy_j, exemplar(record))

    def observe_reading(self, kind: str, sample: SampleOutcome, power_w: float | None) -> None:
        """One device's meter reading: the energy it measured since the last one and how the
        attribution engine split it (and its embodied grams)."""
        device, split, embodied = sample.device, sample.split, sample.embodied
        self.meter_up.labels(device, kind).set(1)
        if sample.energy_j:
            self.device_energy.labels(device).inc(sample.energy_j)
        attributed = sum(split.attributed_j.values())
        if attributed:
            self.attributed_energy.labels(device).inc(attributed)
        if split.idle_j:
            self.unattributed_energy.labels(device, "idle").inc(split.idle_j)
        if split.no_requests_j:
            self.unattributed_energy.labels(device, "no_requests").inc(split.no_requests_j)
        if power_w is not None:
            self.device_power.labels(device).set(power_w)
        if embodied is not None:
            total_g = sum(embodied.attributed_g.values()) + embodied.unattributed_g
            self.device_embodied.labels(device).inc(total_g)
            self.unattributed_embodied.labels(device).inc(embodied.unattributed_g)

    def observe_meter_error(self, device: str, kind: str) -> None:
        """A device could not be read."""
        self.meter_up.labels(device, kind).set(0)

    def observe_calibration(self, relative_error: float) -> None:
        """The calibrated estimator's error on a measured request, before it learned from it."""
        self.estimator_error.observe(relative_error)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


#: The media type of OpenMetrics, the only text format that carries exemplars.
OPENMETRICS = "application/openmetrics-text"


async def metrics_handler(request: web.Request, metrics: Metrics) -> web.Response:
    """The Prometheus text format, or OpenMetrics (with the energy exemplars) when the scraper
    offers it in ``Accept`` (prometheus_client's own negotiation picks its version)."""
    accept = request.headers.get("Accept", "")
    if OPENMETRICS in accept:  # HOOK(tracing): exemplars need OpenMetrics
        encoder, content_type = choose_encoder(accept)
        if content_type.startswith(OPENMETRICS):
            body = encoder(metrics.registry)
            return web.Response(body=body, headers={"Content-Type": content_type})
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
