"""Request records from open to final: the proxy tells it when a request starts, sends its first
byte, streams tokens and ends; the sampler hands it meter readings. It feeds the attribution
engine, exports the device and request metrics, and passes each final record to the ledger.

A request is ``measured`` when every interval of its life on its devices was read; it is
``estimated`` (never zero, unless the upstream did no work for it) when its upstream has no
metered device or the meter failed meanwhile.

A request whose client left before its generation was complete may still be computed by its
server (llama.cpp finishes the slot's generation): it stays in flight, and its record open,
while its expected remaining work is done (``estimators.attribution.abort_linger``), so that
energy is not charged to the requests queued behind it.

An answer for which the upstream did no inference (a 4xx, a 502, the proxy's own 504 before any
response: ``no_work``) is charged nothing from its answer on: its share of the interval of its
answer and of later ones goes to the requests that did work (unattributed when there are none).
What the meter had split while the upstream held it, before the answer, stays charged (the
engine splits each interval once); its basis says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from estimators.attribution import AttributionEngine, Flight, Linger, abort_linger
from estimators.estimator import LLM_TASKS, Estimator, RequestShape
from estimators.meters import Reading
from proxy.metrics import Metrics
from proxy.records import RequestRecord, utc_now_iso
from proxy.tasks import OTHER
from proxy.tracing import exemplar
from proxy.usage.base import Usage

log = logging.getLogger("wattproxy.accounting")

#: A device unread for this long stops holding back the records of requests that ended on it.
DOWN_AFTER_S = 5.0
#: Longest model name kept from a form field (the JSON body's is taken as the client sent it).
MAX_MODEL_CHARS = 256
#: Outcomes where the upstream never got the request: nothing to estimate.
NOT_SERVED = frozenset(("upstream_unavailable", "payload_too_large", "client_timeout"))
#: Outcomes where the client left (or the proxy stopped it) while the upstream had the request:
#: its server may go on computing it.
ABORTED = frozenset(("client_disconnect", "cancelled"))
#: Outcomes where the upstream is gone: once it answered, it stopped working at its last byte the
#: proxy saw, however long the proxy took to notice (an idle timeout, a slow client).
UPSTREAM_GONE = frozenset(("upstream_reset", "upstream_timeout", "upstream_unavailable"))


@dataclass(slots=True)
class OpenRequest:
    record: RequestRecord
    shape: RequestShape
    devices: tuple[str, ...]
    t_start_s: float
    t_first_byte_s: float | None = None
    t_last_token_s: float | None = None
    ended: bool = False
    no_work: bool = False


def no_work(status: int, outcome: str, answered: bool) -> bool:
    """Whether the upstream did no inference for a request that ended with ``status``: a 4xx
    (invalid, too long, unknown model, rate limited), a 502 (the upstream's, or the proxy's when
    it got no answer), or the proxy's own 504 before any response. Other 5xx may come after
    work (a 500 after generating) and are charged as measured. Until a response arrives the
    proxy's status is a 502 placeholder: a client gone before it is an abort, not an answer."""
    if 400 <= status < 500:
        return True
    if status == 502:
        return answered or outcome not in ABORTED
    return status == 504 and outcome == "upstream_timeout" and not answered


class Accountant:
    """Tracks every request from start to final record.

    Args:
        engine: the attribution engine (one for all devices).
        estimator: estimates and work profiles.
        metrics: metric families.
        sink: receives each final record (the ledger writer's ``submit``).
        meter_devices: devices the meter reads.
        meter_kind: the meter's kind, for ``wattproxy_meter_up``.
        g_per_j: grams CO2e per joule now (grid intensity and PUE), never blocking.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        engine: AttributionEngine,
        estimator: Estimator,
        metrics: Metrics,
        sink: Callable[[RequestRecord], None],
        meter_devices: Iterable[str] = (),
        meter_kind: str = "none",
        g_per_j: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.monotonic,
        down_after_s: float = DOWN_AFTER_S,
    ) -> None:
        self.engine = engine
        self.estimator = estimator
        self.metrics = metrics
        self.sink = sink
        self.meter_devices = list(meter_devices)
        self.meter_kind = meter_kind
        self.g_per_j = g_per_j
        self.clock = clock
        self.down_after_s = down_after_s
        self.requests: dict[str, OpenRequest] = {}
        self._load: dict[str, Counter[str]] = {d: Counter() for d in self.meter_devices}
        # cumulative request-seconds per device and task: the simulated meter's input
        self._busy_s: dict[str, dict[str, float]] = {d: {} for d in self.meter_devices}
        self._busy_t_s: dict[str, float] = {}
        self._busy_lock = threading.Lock()
        self._last_energy_j: dict[str, float] = {}
        self._down_since: dict[str, float] = {}
        self._inflight: Counter[str] = Counter()

    # -- the request side -------------------------------------------------------------------

    def begin(
        self,
        record: RequestRecord,
        devices: Iterable[str] | None,
        prompt_tokens_est: int | None,
        stream: bool,
        max_tokens: int | None = None,
        images: int | None = None,
    ) -> OpenRequest:
        now = self.clock()
        wanted = self.meter_devices if devices is None else list(devices)
        metered = (
            tuple(d for d in wanted if d in self._load and d not in self._down_since)
            if record.task != OTHER
            else ()
        )
        shape = RequestShape(
            upstream=record.upstream,
            model=record.model,
            task=record.task,
            prompt_tokens=prompt_tokens_est,
            completion_tokens=max_tokens,
            images=images,
            concurrency=max(1, self._inflight[record.upstream] + 1),
        )
        req = OpenRequest(record, shape, metered, now)
        self.requests[record.request_id] = req
        if metered:
            self.engine.start(
                record.request_id, metered, now, self.estimator.profile(shape, token_stream=stream)
            )
            self._change_load(metered, record.task, +1, now)
        self._inflight[record.upstream] += 1
        self.metrics.inflight_for(record.upstream).inc()
        return req

    def first_byte(self, req: OpenRequest) -> None:
        if req.t_first_byte_s is None:
            now = self.clock()
            req.t_first_byte_s = now
            req.record.ttfb_s = now - req.t_start_s
            if req.devices:
                self.engine.first_byte(req.record.request_id, now)

    def tokens(self, req: OpenRequest, count: int) -> None:
        if count:
            now = req.t_last_token_s = self.clock()
            if req.devices:
                self.engine.tokens(req.record.request_id, count, now)

    def end(self, req: OpenRequest, status: int, usage: Usage, outcome: str = "ok") -> None:
        """The response is over (or broke off): close its timing and wait for the meter."""
        if req.ended:
            return
        req.ended = True
        now = self.clock()
        rec = req.record
        rec.status = status
        rec.outcome = outcome
        rec.ended_at = utc_now_iso()
        t_end = now
        if outcome in UPSTREAM_GONE and req.t_first_byte_s is not None:
            last = req.t_last_token_s
            t_end = last if last is not None and last > req.t_first_byte_s else req.t_first_byte_s
        rec.duration_s = t_end - req.t_start_s
        rec.prompt_tokens = usage.prompt_tokens
        rec.completion_tokens = usage.completion_tokens
        rec.tokens_source = usage.tokens_source
        if rec.model is None and usage.model:
            rec.model = usage.model[:MAX_MODEL_CHARS]  # named in a multipart form field
        shape = req.shape
        req.shape = RequestShape(  # as dataclasses.replace, without its introspection
            upstream=shape.upstream,
            model=rec.model,
            task=shape.task,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            duration_s=rec.duration_s,
            images=usage.images if usage.images is not None else shape.images,
            concurrency=shape.concurrency,
        )
        m = self.metrics
        model = m.model_label(rec.model)
        m.inflight_for(rec.upstream).dec()
        self._inflight[rec.upstream] -= 1
        if self._inflight[rec.upstream] <= 0:
            del self._inflight[rec.upstream]
        series = m.series(rec.upstream, model, rec.task)
        series.requests(str(status)).inc()
        m.outcome_for(rec.upstream, outcome).inc()
        series.duration.observe(rec.duration_s)
        if rec.ttfb_s is not None:
            series.ttfb.observe(rec.ttfb_s)
        if usage.prompt_tokens:
            series.prompt_tokens.inc(usage.prompt_tokens)
        if usage.completion_tokens:
            series.completion_tokens.inc(usage.completion_tokens)
        req.no_work = no_work(status, outcome, req.t_first_byte_s is not None)
        if not req.devices:
            self._finalize(req, None)
            return
        linger = None
        if outcome in ABORTED and not req.no_work:
            linger = self._linger(req, shape, usage)
        if usage.prompt_tokens is not None:
            self.engine.set_prompt_tokens(rec.request_id, usage.prompt_tokens)
        self._change_load(req.devices, rec.task, -1, now)
        flight = self.engine.end(rec.request_id, t_end, linger, charge=not req.no_work)
        if flight is not None and flight.final:
            self._finalize(req, flight)

    def _linger(self, req: OpenRequest, shape: RequestShape, usage: Usage) -> Linger | None:
        """The work an aborted generation still has ahead on its server, if any: none once it
        was complete (a non-streamed answer had arrived, or the server's final usage had)."""
        if req.record.task not in LLM_TASKS:
            return None
        flight = self.engine.flight(req.record.request_id)
        if flight is None:
            return None
        if req.t_first_byte_s is not None and (
            not flight.profile.token_stream
            or (usage.tokens_source == "server" and usage.completion_tokens is not None)
        ):
            return None
        return abort_linger(
            flight.decoded_tokens,
            self.estimator.expected_completion_tokens(shape),
            req.t_first_byte_s,
            req.t_last_token_s,
        )

    def provisional(self, request_id: str) -> RequestRecord | None:
        """The record as it stands, with the energy attributed so far (``final`` false)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        rec = replace(req.record, extra=dict(req.record.extra))
        flight = self.engine.flight(request_id)
        if flight is not None:
            rec.energy_j = flight.energy_j
            rec.co2e_g = flight.co2e_g
            rec.source = "measured" if flight.gaps == 0 else "estimated"
        rec.final = False
        return rec

    def _advance(self, device: str, now: float) -> None:
        last = self._busy_t_s.get(device, now)
        self._busy_t_s[device] = now
        if now > last:
            busy = self._busy_s.setdefault(device, {})
            for task, n in self._load[device].items():
                if n > 0:
                    busy[task] = busy.get(task, 0.0) + n * (now - last)

    def _change_load(self, devices: Iterable[str], task: str, delta: int, now: float) -> None:
        with self._busy_lock:
            for d in devices:
                self._advance(d, now)
                self._load[d][task] += delta

    def load(self) -> dict[str, dict[str, float]]:
        """Device -> task -> cumulative seconds of requests in flight (the simulated meter's
        input). Called from the meter's thread, hence the lock."""
        now = self.clock()
        with self._busy_lock:
            for d in self._load:
                self._advance(d, now)
            return {d: dict(b) for d, b in self._busy_s.items()}

    # -- the meter side ---------------------------------------------------------------------

    def on_reading(self, reading: Reading) -> None:
        t = reading.timestamp_s
        g_per_j = self.g_per_j()
        m = self.metrics
        for device, total_j in reading.energy_j.items():
            if device not in self._load:
                with self._busy_lock:
                    self._load[device] = Counter()
                self.meter_devices.append(device)
            self._down_since.pop(device, None)
            last = self._last_energy_j.get(device)
            self._last_energy_j[device] = total_j
            delta_j = 0.0 if last is None or total_j < last else total_j - last
            outcome, finals = self.engine.sample(device, t, delta_j, g_per_j)
            m.meter_up.labels(device, self.meter_kind).set(1)
            if delta_j:
                m.device_energy.labels(device).inc(delta_j)
            split = outcome.split
            attributed = sum(split.attributed_j.values())
            if attributed:
                m.attributed_energy.labels(device).inc(attributed)
            if split.idle_j:
                m.unattributed_energy.labels(device, "idle").inc(split.idle_j)
            if split.no_requests_j:
                m.unattributed_energy.labels(device, "no_requests").inc(split.no_requests_j)
            power = reading.power_w.get(device)
            if power is not None:
                m.device_power.labels(device).set(power)
            self._finalize_flights(finals)
        for device, reason in reading.errors.items():
            m.meter_up.labels(device, self.meter_kind).set(0)
            since = self._down_since.setdefault(device, t)
            if since == t:
                log.warning("meter %s cannot read %s: %s", self.meter_kind, device, reason)
            self.engine.gap(device, t)
            if t - since >= self.down_after_s:
                self._finalize_flights(self.engine.drop_device(device, t))

    def drain(self) -> int:
        """At shutdown: finalize every request that has ended, with what was measured so far."""
        ended = [r for r in self.requests.values() if r.ended]
        for req in ended:
            flight = self.engine.flight(req.record.request_id)
            self._finalize(req, flight)
        return len(ended)

    def _finalize_flights(self, flights: Iterable[Flight]) -> None:
        for flight in flights:
            req = self.requests.get(flight.request_id)
            if req is not None and req.ended:
                self._finalize(req, flight)

    def _finalize(self, req: OpenRequest, flight: Flight | None) -> None:
        rec = req.record
        self.requests.pop(rec.request_id, None)
        if rec.task == OTHER or (flight is None and rec.outcome in NOT_SERVED):
            rec.energy_j, rec.co2e_g, rec.source = 0.0, 0.0, "estimated"
            rec.basis = "no inference" if rec.task == OTHER else "not served upstream"
        elif req.no_work:
            what = f"no work upstream (HTTP {rec.status})"
            if flight is not None and flight.gaps == 0:
                rec.energy_j, rec.co2e_g, rec.source = flight.energy_j, flight.co2e_g, "measured"
                rec.basis = (
                    f"{what}: not charged from its answer on, only its share measured before "
                    "its answer, while the upstream held it"
                )
            else:
                rec.energy_j, rec.co2e_g, rec.source = 0.0, 0.0, "estimated"
                rec.basis = f"{what}: not charged"
        elif flight is not None and flight.gaps == 0:
            rec.energy_j, rec.co2e_g, rec.source = flight.energy_j, flight.co2e_g, "measured"
            lingered_s = flight.lingered_s
            if lingered_s > 0.0:
                # its energy includes tokens nobody counted: not a sample for calibration
                rec.basis = (
                    "measured; the client left before its generation was complete, so it is "
                    f"charged until its expected remaining work was done ({lingered_s:.1f} s "
                    "after it ended)"
                )
                rec.extra["linger_s"] = round(lingered_s, 3)
            else:
                rec.basis = "measured"
                self.estimator.observe(req.shape, flight.energy_j)
                error = self.estimator.last_relative_error()
                if error is not None:
                    self.metrics.estimator_error.observe(error)
        else:
            estimate = self.estimator.estimate(req.shape)
            rec.energy_j = estimate.energy_j
            rec.co2e_g = estimate.energy_j * self.g_per_j()
            rec.source = "estimated"
            rec.basis = estimate.basis
            rec.extra["estimate_method"] = estimate.method
        rec.final = True
        m = self.metrics
        energy, co2e = m.energy_for(rec.upstream, rec.model, rec.task, rec.source, rec.user)
        energy.inc(rec.energy_j)
        co2e.inc(rec.co2e_g)
        if rec.task != OTHER:
            # HOOK(tracing): the trace id as exemplar (rendered in OpenMetrics only)
            m.request_energy.labels(rec.task).observe(rec.energy_j, exemplar(rec))
        self.sink(rec)
