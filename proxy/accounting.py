"""Request records from open to final: the proxy tells it when a request starts, sends its first
byte, streams tokens and ends; the sampler hands it meter readings. It feeds the attribution
engine, tells an ``Observer`` (the metrics) what it sees, and passes each final record to the
sink (the ledger writer, the final metrics). What a record is charged is ``proxy.finalize``'s.

A request is ``measured`` when every interval of its life on its devices was read; it is
``estimated`` (never zero, unless the upstream did no work for it) when its upstream has no
metered device or the meter failed meanwhile.

A request whose client left before its generation was complete may still be computed by its
server (llama.cpp finishes the slot's generation): it stays in flight, and its record open,
while its expected remaining work is done (``estimators.attribution.abort_linger``), so that
energy is not charged to the requests queued behind it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from estimators.attribution import (
    AttributionEngine,
    Flight,
    Linger,
    SampleOutcome,
    abort_linger,
)
from estimators.estimator import LLM_TASKS, Estimator, RequestShape
from estimators.meters import Reading
from proxy.finalize import ABORTED, MEASURED, finalize, no_work
from proxy.records import RequestRecord, utc_now_iso
from proxy.tasks import OTHER
from proxy.usage.base import Usage

log = logging.getLogger("wattproxy.accounting")

#: A device unread for this long stops holding back the records of requests that ended on it.
DOWN_AFTER_S = 5.0
#: Longest model name kept from a form field (the JSON body's is taken as the client sent it).
MAX_MODEL_CHARS = 256
#: Outcomes where the upstream is gone: once it answered, it stopped working at its last byte the
#: proxy saw, however long the proxy took to notice (an idle timeout, a slow client).
UPSTREAM_GONE = frozenset(("upstream_reset", "upstream_timeout", "upstream_unavailable"))


class Observer(Protocol):
    """Hears of requests and readings as the accountant sees them (``proxy.metrics.Metrics``)."""

    def observe_start(self, record: RequestRecord) -> None: ...

    def observe_end(self, record: RequestRecord) -> None: ...

    def observe_reading(self, kind: str, sample: SampleOutcome, power_w: float | None) -> None: ...

    def observe_meter_error(self, device: str, kind: str) -> None: ...

    def observe_calibration(self, relative_error: float) -> None: ...


class LoadObserver(Protocol):
    """Told when a metered request starts and ends on its devices (the simulated meter's
    ``LoadTracker``)."""

    def started(self, devices: Iterable[str], task: str, t_s: float) -> None: ...

    def ended(self, devices: Iterable[str], task: str, t_s: float) -> None: ...


class NoObserver:
    """An observer that ignores everything (tests of accounting alone)."""

    def observe_start(self, record: RequestRecord) -> None:
        pass

    def observe_end(self, record: RequestRecord) -> None:
        pass

    def observe_reading(self, kind: str, sample: SampleOutcome, power_w: float | None) -> None:
        pass

    def observe_meter_error(self, device: str, kind: str) -> None:
        pass

    def observe_calibration(self, relative_error: float) -> None:
        pass


class Unset(enum.Enum):
    """No figure of an upstream's own: the ``carbon:`` section's applies."""

    UNSET = "unset"


UNSET = Unset.UNSET


class Grid(Protocol):
    """Grids other than the ``carbon:`` section's (upstreams with their own ``carbon``)."""

    def device_g_per_j(self, device: str) -> float | None: ...

    def upstream_g_per_j(self, upstream: str) -> float | None: ...

    def upstream_water_l_per_j(self, upstream: str) -> float | Unset | None:
        """Litres per joule of an upstream in its own zone (None: not reported), ``UNSET``
        when the ``carbon:`` section's figure applies."""
        ...


@dataclass(slots=True)
class OpenRequest:
    record: RequestRecord
    shape: RequestShape
    devices: tuple[str, ...]
    t_start_s: float
    t_first_byte_s: float | None = None
    t_last_token_s: float | None = None
    ended: bool = False

    def mark_first_byte(self, now: float) -> None:
        self.t_first_byte_s = now
        self.record.ttfb_s = now - self.t_start_s

    def provisional_record(self) -> RequestRecord:
        """A copy of its record, for the figures so far (``final`` false)."""
        rec = replace(self.record, extra=dict(self.record.extra))
        rec.final = False
        return rec


class Accounts(Protocol):
    """What the request path needs of the accounting: the ``Accountant`` itself in a single
    process, a worker's ``proxy.workers.remote.RemoteAccountant`` with several."""

    @property
    def estimator(self) -> Estimator: ...

    @property
    def requests(self) -> Mapping[str, OpenRequest]: ...

    def admit(self) -> None:
        """Raise ``Overloaded`` when no more requests can be accounted for now."""
        ...

    def begin(
        self,
        record: RequestRecord,
        devices: Iterable[str] | None,
        prompt_tokens_est: int | None,
        stream: bool,
        max_tokens: int | None = None,
        images: int | None = None,
        now: float | None = None,
    ) -> OpenRequest: ...

    def first_byte(self, req: OpenRequest, now: float | None = None) -> None: ...

    def tokens(self, req: OpenRequest, count: int, now: float | None = None) -> None: ...

    def end(
        self,
        req: OpenRequest,
        status: int,
        usage: Usage,
        outcome: str = "ok",
        now: float | None = None,
    ) -> None: ...

    def provisional(self, request_id: str) -> RequestRecord | None: ...

    def want_figures(self, req: OpenRequest) -> None:
        """``provisional`` will be asked for this request (energy in its answer)."""
        ...

    def upstream_g_per_j(self, upstream: str) -> float: ...


class Accountant:
    """Tracks every request from start to final record.

    Args:
        engine: the attribution engine (one for all devices).
        estimator: estimates and work profiles (and calibration, from measured requests).
        sink: receives each final record.
        observer: told of starts, ends, readings and calibration errors (the metrics).
        load: told when metered requests start and end (the simulated meter's tracker).
        meter_devices: devices the meter reads.
        meter_kind: the meter's kind, for ``wattproxy_meter_up``.
        g_per_j: grams CO2e per joule now (grid intensity and PUE), never blocking.
        grid: where a device or an upstream draws from another grid than ``carbon:`` (an
            upstream's own ``carbon`` section): its grams per joule now, else ``None``.
        water_l_per_j: litres of water per joule (on-site WUE and the grid's), or ``None``.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        engine: AttributionEngine,
        estimator: Estimator,
        sink: Callable[[RequestRecord], None],
        *,
        observer: Observer | None = None,
        load: LoadObserver | None = None,
        meter_devices: Iterable[str] = (),
        meter_kind: str = "none",
        g_per_j: Callable[[], float] = lambda: 0.0,
        grid: Grid | None = None,
        water_l_per_j: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        down_after_s: float = DOWN_AFTER_S,
    ) -> None:
        self.engine = engine
        self.estimator = estimator
        self.sink = sink
        self.observer: Observer = observer if observer is not None else NoObserver()
        self.load = load
        self.meter_devices = list(meter_devices)
        self._metered = set(self.meter_devices)
        self.meter_kind = meter_kind
        self.g_per_j = g_per_j
        self.grid = grid
        self.water_l_per_j = water_l_per_j
        self.clock = clock
        self.down_after_s = down_after_s
        self.requests: dict[str, OpenRequest] = {}
        self._last_energy_j: dict[str, float] = {}
        self._down_since: dict[str, float] = {}
        self._inflight: Counter[str] = Counter()

    # -- the request side -------------------------------------------------------------------

    def admit(self) -> None:
        pass  # in one process every request is accounted as it goes

    def begin(
        self,
        record: RequestRecord,
        devices: Iterable[str] | None,
        prompt_tokens_est: int | None,
        stream: bool,
        max_tokens: int | None = None,
        images: int | None = None,
        now: float | None = None,
    ) -> OpenRequest:
        """Open the request's record (``now``: when it started, monotonic seconds, if not now:
        a worker process's event read later)."""
        if now is None:
            now = self.clock()
        wanted = self.meter_devices if devices is None else list(devices)
        metered = (
            tuple(d for d in wanted if d in self._metered and d not in self._down_since)
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
            if self.load is not None:
                self.load.started(metered, record.task, now)
        self._inflight[record.upstream] += 1
        self.observer.observe_start(record)
        return req

    def first_byte(self, req: OpenRequest, now: float | None = None) -> None:
        if req.t_first_byte_s is None:
            if now is None:
                now = self.clock()
            req.mark_first_byte(now)
            if req.devices:
                self.engine.first_byte(req.record.request_id, now)

    def tokens(self, req: OpenRequest, count: int, now: float | None = None) -> None:
        if count:
            if now is None:
                now = self.clock()
            req.t_last_token_s = now
            if req.devices:
                self.engine.tokens(req.record.request_id, count, now)

    def end(
        self,
        req: OpenRequest,
        status: int,
        usage: Usage,
        outcome: str = "ok",
        now: float | None = None,
    ) -> None:
        """The response is over (or broke off): close its timing and wait for the meter."""
        if req.ended:
            return
        req.ended = True
        if now is None:
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
        self._inflight[rec.upstream] -= 1
        if self._inflight[rec.upstream] <= 0:
            del self._inflight[rec.upstream]
        self.observer.observe_end(rec)
        if not req.devices:
            self._finalize(req, None)
            return
        charge = not no_work(status, outcome, req.t_first_byte_s is not None)
        linger = None
        if outcome in ABORTED and charge:
            linger = self._linger(req, shape, usage)
        if usage.prompt_tokens is not None:
            self.engine.set_prompt_tokens(rec.request_id, usage.prompt_tokens)
        if self.load is not None:
            self.load.ended(req.devices, rec.task, now)
        flight = self.engine.end(rec.request_id, t_end, linger, charge=charge)
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

    def want_figures(self, req: OpenRequest) -> None:
        pass  # the figures are here

    def provisional(self, request_id: str) -> RequestRecord | None:
        """The record as it stands, with the energy attributed so far (``final`` false)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        rec = req.provisional_record()
        flight = self.engine.flight(request_id)
        if flight is not None:
            rec.energy_j = flight.energy_j
            rec.co2e_g = flight.co2e_g
            rec.embodied_co2e_g = flight.embodied_g
            rec.source = "measured" if flight.gaps == 0 else "estimated"
        return rec

    # -- the meter side ---------------------------------------------------------------------

    def on_reading(self, reading: Reading) -> None:
        t = reading.timestamp_s
        g_per_j = self.g_per_j()
        grid = self.grid
        observer = self.observer
        for device, total_j in reading.energy_j.items():
            if device not in self._metered:
                self._metered.add(device)
                self.meter_devices.append(device)
            self._down_since.pop(device, None)
            last = self._last_energy_j.get(device)
            self._last_energy_j[device] = total_j
            delta_j = 0.0 if last is None or total_j < last else total_j - last
            own = grid.device_g_per_j(device) if grid is not None else None
            outcome, finals = self.engine.sample(
                device, t, delta_j, g_per_j if own is None else own
            )
            observer.observe_reading(self.meter_kind, outcome, reading.power_w.get(device))
            self._finalize_flights(finals)
        for device, reason in reading.errors.items():
            observer.observe_meter_error(device, self.meter_kind)
            since = self._down_since.setdefault(device, t)
            if since == t:
                log.warning("meter %s cannot read %s: %s", self.meter_kind, device, reason)
            self.engine.gap(device, t)
            if t - since >= self.down_after_s:
                self._finalize_flights(self.engine.drop_device(device, t))

    def upstream_g_per_j(self, upstream: str) -> float:
        """Grams CO2e per joule now where ``upstream`` draws its power."""
        own = self.grid.upstream_g_per_j(upstream) if self.grid is not None else None
        return self.g_per_j() if own is None else own

    def upstream_water_l_per_j(self, upstream: str) -> float | None:
        """Litres of water per joule where ``upstream`` draws its power (None: not reported)."""
        if self.grid is not None:
            own = self.grid.upstream_water_l_per_j(upstream)
            if own is not UNSET:
                return own
        return self.water_l_per_j

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
        finalize(
            rec,
            flight,
            lambda: self.estimator.estimate(req.shape),
            self.upstream_g_per_j(rec.upstream),
            self.upstream_water_l_per_j(rec.upstream),
        )
        if flight is not None and rec.basis == MEASURED:
            self.estimator.observe(req.shape, flight.energy_j)
            error = self.estimator.last_relative_error()
            if error is not None:
                self.observer.observe_calibration(error)
        self.sink(rec)
