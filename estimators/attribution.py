"""Where a measured joule is counted: per device, each sample interval is split over the requests
that were in flight on it.

Pure: no clock, no I/O. The sampler feeds it interval energies; the proxy feeds it request starts,
first bytes, streamed tokens and ends. The invariant, per device, at every moment:

    measured_j == attributed_j + idle_j + no_requests_j      (to float rounding)

Weighting ``time`` splits an interval by overlap seconds. Weighting ``work`` splits it by each
request's estimated energy *in that interval*: prefill (its prompt tokens' work, weighed once in
total, spread over start -> first byte), decode (tokens streamed in the interval) and, for
requests without a token stream, their expected energy spread over their elapsed life. The
estimator only sets the proportions; the meter sets the total.

A request aborted by its client may still be computed by its server (llama.cpp finishes the
generation of a slot whose client left): it can *linger* after its end, weighed at the decode
speed it streamed at, until its expected remaining work is done (``abort_linger``), its device
goes quiet, or ``MAX_LINGER_S`` has passed; its record is final only then. An interval no request
claims work in is split by time, except to streams gone silent (``SILENT_AFTER_S`` without a
token: their upstream died or hangs; under ``time`` weighting they get no share at all); with
none left it is unattributed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from estimators.embodied import EmbodiedSplit, split_embodied

#: Prefill speed assumed while a request has not sent its first byte (prompt tokens per second,
#: batched prefill on a datacenter GPU); only how an unfinished prefill is spread depends on it.
ASSUMED_PREFILL_TOKENS_PER_S = 5000.0
#: Decode speed assumed for an aborted request that streamed too few tokens to measure its own.
ASSUMED_DECODE_TOKENS_PER_S = 20.0
#: The longest an aborted request is kept in flight after its end (its server may have stopped).
MAX_LINGER_S = 30.0
#: An interval whose power is within this fraction of the idle power is quiet: a lingering
#: request's server is done with it. Small, so that a single low-power stream is not taken for
#: quiet (one stream of the accuracy benchmark draws 10 % over idle).
QUIET_MARGIN = 0.05
#: A stream that sent tokens and then none for this long (its upstream died or hangs) stops
#: taking a share of intervals no request claims work in (at least this, or four of its own
#: token gaps).
SILENT_AFTER_S = 1.0
SILENT_GAPS = 4.0
#: The smallest span (s) used as a denominator, so a request that starts and ends on the same
#: clock tick still gets its share.
MIN_SPAN_S = 1e-6


class Weighting(enum.StrEnum):
    WORK = "work"
    TIME = "time"


class IdlePolicy(enum.StrEnum):
    EXCLUDE = "exclude"  # idle watts are reported as unattributed ``idle``, not charged
    INCLUDE = "include"  # idle watts are charged to whoever is in flight


@dataclass(frozen=True, slots=True)
class IntervalSplit:
    """How one interval's energy on one device was divided."""

    attributed_j: dict[str, float]
    idle_j: float = 0.0
    no_requests_j: float = 0.0

    @property
    def unattributed_j(self) -> float:
        return self.idle_j + self.no_requests_j


def split_interval(
    energy_j: float,
    duration_s: float,
    weights: Mapping[str, float],
    idle_power_w: float = 0.0,
    idle: IdlePolicy = IdlePolicy.EXCLUDE,
) -> IntervalSplit:
    """Divide ``energy_j`` drawn over ``duration_s`` among ``weights`` (request id -> weight).

    With no request in flight everything is ``no_requests``. Under ``exclude`` the idle share
    (``idle_power_w * duration_s``, capped at the energy) is unattributed ``idle``. The rest goes
    by weight; zero or negative weights everywhere fall back to an even split.
    """
    energy_j = max(0.0, energy_j)
    if not weights:
        return IntervalSplit({}, no_requests_j=energy_j)
    idle_j = 0.0
    if idle is IdlePolicy.EXCLUDE:
        idle_j = min(energy_j, max(0.0, idle_power_w) * max(0.0, duration_s))
    rest_j = energy_j - idle_j
    positive = {rid: w for rid, w in weights.items() if w > 0.0}
    total_w = sum(positive.values())
    if total_w <= 0.0:
        even = rest_j / len(weights)
        return IntervalSplit(dict.fromkeys(weights, even), idle_j=idle_j)
    shares = {rid: rest_j * (w / total_w) for rid, w in positive.items()}
    # the rounding residual goes to the largest share, so the split adds up exactly
    largest = max(shares, key=shares.__getitem__)
    shares[largest] = max(0.0, shares[largest] + (rest_j - sum(shares.values())))
    return IntervalSplit(shares, idle_j=idle_j)


@dataclass(frozen=True, slots=True)
class WorkProfile:
    """The estimator's relative costs for one request (joules; only proportions matter).

    Args:
        prompt_tokens: prompt size, estimated at start and corrected when usage arrives.
        prefill_j_per_token: estimated joules per prompt token.
        decode_j_per_token: estimated joules per generated token.
        expected_j: the whole request's estimate, used when it streams no tokens.
        token_stream: whether generated tokens will be reported as they stream.
    """

    prompt_tokens: float = 0.0
    prefill_j_per_token: float = 0.1
    decode_j_per_token: float = 1.0
    expected_j: float = 1.0
    token_stream: bool = False


@dataclass(frozen=True, slots=True)
class Linger:
    """How long an aborted request's work goes on after its end, and at what decode speed."""

    duration_s: float
    tokens_per_s: float


def abort_linger(
    decoded_tokens: float,
    expected_tokens: float,
    first_byte_s: float | None,
    last_token_s: float | None,
    max_s: float = MAX_LINGER_S,
) -> Linger | None:
    """The work left to an aborted request: ``expected_tokens - decoded_tokens`` at the speed it
    was seen streaming (tokens after the first over first byte -> last token), or at
    ``ASSUMED_DECODE_TOKENS_PER_S`` before two tokens; at most ``max_s``. ``None`` when its
    expected generation is already complete."""
    remaining = expected_tokens - decoded_tokens
    if not remaining > 0.0:
        return None
    rate = ASSUMED_DECODE_TOKENS_PER_S
    if first_byte_s is not None and last_token_s is not None and decoded_tokens >= 2.0:
        span_s = last_token_s - first_byte_s
        if span_s > 0.0:
            rate = (decoded_tokens - 1.0) / span_s
    return Linger(min(max_s, remaining / rate), rate)


@dataclass(slots=True)
class Flight:
    """A request's state inside the engine."""

    request_id: str
    devices: tuple[str, ...]
    start_s: float
    profile: WorkProfile
    first_byte_s: float | None = None
    end_s: float | None = None
    #: until when it is weighed: its end, or later while an aborted request's work goes on
    work_end_s: float | None = None
    linger_tokens_per_s: float = 0.0
    #: false once it is known to have done no work (an answer without upstream work): no
    #: weight in any interval split from then on
    charged: bool = True
    decoded_tokens: float = 0.0
    last_token_s: float | None = None
    energy_j: float = 0.0
    co2e_g: float = 0.0
    #: embodied grams charged so far; ``None`` when none of its devices has embodied figures
    embodied_g: float | None = None
    # per device: decoded tokens already weighed, and whether that device has covered the end
    _tokens_weighed: dict[str, float] = field(default_factory=dict)
    _prefill_weighed: dict[str, float] = field(default_factory=dict)
    _open_on: set[str] = field(default_factory=set)
    gaps: int = 0  # intervals on its devices that could not be measured

    @property
    def final(self) -> bool:
        return self.end_s is not None and not self._open_on

    @property
    def lingered_s(self) -> float:
        """How long it was kept in flight after its end (an aborted request's work)."""
        if self.end_s is None or self.work_end_s is None:
            return 0.0
        return max(0.0, self.work_end_s - self.end_s)


@dataclass(slots=True)
class DeviceTotals:
    measured_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    no_requests_j: float = 0.0
    embodied_g: float = 0.0  # rate x seconds between its first and latest sample
    attributed_embodied_g: float = 0.0
    unattributed_embodied_g: float = 0.0
    last_sample_s: float | None = None
    idle_power_w: float | None = None  # learned from quiet intervals under ``idle_watts: auto``
    min_power_w: float | None = None

    @property
    def unattributed_j(self) -> float:
        return self.idle_j + self.no_requests_j


@dataclass(frozen=True, slots=True)
class SampleOutcome:
    """What one device sample changed, for metrics."""

    device: str
    energy_j: float
    split: IntervalSplit
    embodied: EmbodiedSplit | None = None


#: Weight of a quiet interval in the learned idle power (exponential moving average).
IDLE_EMA_ALPHA = 0.2


def _in_interval(f: Flight, t0: float, t1: float) -> bool:
    """Whether the flight was in flight during (t0, t1] (an instant one at its start, too)."""
    start, end_s = f.start_s, f.work_end_s
    end = t1 if end_s is None or not end_s < t1 else end_s
    return end > (start if start > t0 else t0) or (start == end_s and t0 < start <= t1)


def _silent(f: Flight, t_s: float) -> bool:
    """Whether a stream that has sent tokens has sent none for ``SILENT_AFTER_S`` (or four of
    its own token gaps, if longer) by ``t_s``. An aborted request lingering after its end is
    never silent: its tokens are no longer relayed, its work is assumed to go on."""
    last = f.last_token_s
    fb = f.first_byte_s
    if last is None or fb is None or f.decoded_tokens <= 0.0 or not f.profile.token_stream:
        return False
    if f.linger_tokens_per_s > 0.0:
        return False
    after_s = SILENT_AFTER_S
    if f.decoded_tokens >= 2.0 and last > fb:
        gaps_s = SILENT_GAPS * (last - fb) / (f.decoded_tokens - 1.0)
        after_s = gaps_s if gaps_s > after_s else after_s
    return t_s - last >= after_s


class AttributionEngine:
    """Per-device interval attribution with provisional and final per-request figures.

    Args:
        weighting: ``work`` or ``time``.
        idle: the idle policy.
        idle_power_w: a fixed idle power per device, or ``None`` to learn it from quiet
            intervals (until one is seen, the lowest power observed stands in).
    """

    def __init__(
        self,
        weighting: Weighting = Weighting.WORK,
        idle: IdlePolicy = IdlePolicy.EXCLUDE,
        idle_power_w: float | None = None,
        embodied_g_per_s: Mapping[str, float] | None = None,
    ) -> None:
        self.weighting = weighting
        #: per device: embodied grams per second of its life (devices without figures absent)
        self.embodied_g_per_s = dict(embodied_g_per_s or {})
        self.idle = idle
        self.fixed_idle_power_w = idle_power_w
        self.devices: dict[str, DeviceTotals] = {}
        self._flights: dict[str, Flight] = {}
        self._on_device: dict[str, dict[str, Flight]] = {}
        self._lingering: dict[str, Flight] = {}  # ended, aborted, their work still going on

    # -- requests ---------------------------------------------------------------------------

    def start(
        self, request_id: str, devices: Iterable[str], t_s: float, profile: WorkProfile
    ) -> Flight:
        devs = tuple(dict.fromkeys(devices))
        flight = Flight(request_id, devs, t_s, profile)
        flight._open_on = set(devs)
        if any(d in self.embodied_g_per_s for d in devs):
            flight.embodied_g = 0.0
        self._flights[request_id] = flight
        for device in devs:
            self._on_device.setdefault(device, {})[request_id] = flight
            self.devices.setdefault(device, DeviceTotals())
        return flight

    def first_byte(self, request_id: str, t_s: float) -> None:
        flight = self._flights.get(request_id)
        if flight is not None and flight.first_byte_s is None:
            flight.first_byte_s = t_s

    def tokens(self, request_id: str, count: float, t_s: float | None = None) -> None:
        """``count`` more tokens streamed (at ``t_s``, when known: a stream that stops sending
        them is told from one that is merely slow by it)."""
        flight = self._flights.get(request_id)
        if flight is not None:
            flight.decoded_tokens += count
            if t_s is not None:
                flight.last_token_s = t_s

    def set_prompt_tokens(self, request_id: str, prompt_tokens: float) -> None:
        flight = self._flights.get(request_id)
        if flight is not None:
            p = flight.profile
            flight.profile = WorkProfile(
                prompt_tokens,
                p.prefill_j_per_token,
                p.decode_j_per_token,
                p.expected_j,
                p.token_stream,
            )

    def end(
        self, request_id: str, t_s: float, linger: Linger | None = None, charge: bool = True
    ) -> Flight | None:
        """Mark the end; the flight stays until every device has sampled past ``t_s``, or past
        ``t_s + linger.duration_s`` for an aborted request whose work goes on. ``charge=False``
        (no work was done for it): it gets no share of any interval split from now on; its
        share goes to the requests that did work, or is unattributed when there are none."""
        flight = self._flights.get(request_id)
        if flight is None:
            return None
        flight.charged = charge
        flight.end_s = max(t_s, flight.start_s)
        flight.work_end_s = flight.end_s
        if linger is not None and linger.duration_s > 0.0 and linger.tokens_per_s > 0.0:
            flight.work_end_s = flight.end_s + linger.duration_s
            flight.linger_tokens_per_s = linger.tokens_per_s
            self._lingering[request_id] = flight
        if flight.first_byte_s is None:
            flight.first_byte_s = flight.end_s
        if not flight._open_on:
            self._flights.pop(request_id, None)
            self._lingering.pop(request_id, None)
        return flight

    def flight(self, request_id: str) -> Flight | None:
        return self._flights.get(request_id)

    # -- samples ----------------------------------------------------------------------------

    def sample(
        self, device: str, t_s: float, energy_j: float, g_per_j: float = 0.0
    ) -> tuple[SampleOutcome, list[Flight]]:
        """Account the energy drawn on ``device`` since its previous sample, ending at ``t_s``.

        ``g_per_j`` converts this interval's joules to grams CO2e (intensity at the time it was
        drawn, times PUE). Returns the split and the flights that became final.
        """
        totals = self.devices.setdefault(device, DeviceTotals())
        t0 = totals.last_sample_s
        totals.last_sample_s = t_s if t0 is None else max(t0, t_s)
        energy_j = max(0.0, energy_j)
        flights = self._on_device.get(device, {})
        if t0 is None:
            # The first sample only sets the clock; energy before it belongs to nobody we saw.
            split = IntervalSplit({}, no_requests_j=energy_j)
            self._book(totals, split, energy_j)
            return SampleOutcome(device, energy_j, split), self._close(device, flights, t_s)
        duration_s = max(0.0, t_s - t0)
        if self._lingering:
            self._end_lingering_if_quiet(device, totals, t0, energy_j, duration_s)
        weights = self._weights(device, flights, t0, t_s)
        # quiet: no request at all in the interval (one that claims nothing still is one)
        quiet = not weights and not any(_in_interval(f, t0, t_s) for f in flights.values())
        idle_w = self._idle_power_w(totals, energy_j, duration_s, quiet=quiet)
        split = split_interval(energy_j, duration_s, weights, idle_w, self.idle)
        for rid, share_j in split.attributed_j.items():
            flight = flights[rid]
            flight.energy_j += share_j
            flight.co2e_g += share_j * g_per_j
        self._book(totals, split, energy_j)
        embodied = self._embodied(device, totals, flights, t0, t_s)
        return SampleOutcome(device, energy_j, split, embodied), self._close(device, flights, t_s)

    def _embodied(
        self,
        device: str,
        totals: DeviceTotals,
        flights: Mapping[str, Flight],
        t0: float,
        t1: float,
    ) -> EmbodiedSplit | None:
        """Split the interval's embodied grams by time among the requests that did work in it
        (those known to have done none are left out, as from the energy split)."""
        rate = self.embodied_g_per_s.get(device)
        if rate is None:
            return None
        spans = {
            rid: (f.start_s, t1 if f.work_end_s is None else f.work_end_s)
            for rid, f in flights.items()
            if f.charged
        }
        split = split_embodied(rate, t0, t1, spans)
        for rid, share_g in split.attributed_g.items():
            f = flights[rid]
            f.embodied_g = (f.embodied_g or 0.0) + share_g
        attributed_g = sum(split.attributed_g.values())
        totals.embodied_g += attributed_g + split.unattributed_g
        totals.attributed_embodied_g += attributed_g
        totals.unattributed_embodied_g += split.unattributed_g
        return split

    def gap(self, device: str, t_s: float) -> None:
        """The device could not be read: requests in flight on it are marked as having a gap."""
        for flight in self._on_device.get(device, {}).values():
            flight.gaps += 1

    def drop_device(self, device: str, t_s: float) -> list[Flight]:
        """Forget a device (meter gone): its flights stop waiting for it."""
        flights = self._on_device.get(device, {})
        for flight in flights.values():
            flight.gaps += 1
        return self._close(device, flights, float("inf"))

    # -- internals --------------------------------------------------------------------------

    def _end_lingering_if_quiet(
        self, device: str, totals: DeviceTotals, t0: float, energy_j: float, duration_s: float
    ) -> None:
        """A quiet interval (power within ``QUIET_MARGIN`` of idle) means the server is done
        with the aborted requests lingering on this device: they stop being weighed at ``t0``."""
        if duration_s <= 0.0:
            return
        idle_w = self._idle_now_w(totals)
        if energy_j > idle_w * duration_s * (1.0 + QUIET_MARGIN):
            return
        for rid, f in list(self._lingering.items()):
            if device in f._open_on and f.end_s is not None:
                f.work_end_s = f.end_s if f.end_s > t0 else t0
                del self._lingering[rid]

    def _weights(
        self, device: str, flights: Mapping[str, Flight], t0: float, t1: float
    ) -> dict[str, float]:
        # The hot loop of a sample (one pass over every flight on the device): comparisons are
        # written out instead of calling min()/max(), with the same results (NaN included).
        weights: dict[str, float] = {}
        work = self.weighting is Weighting.WORK
        work_of = self._work
        for rid, f in flights.items():
            if not f.charged:
                continue
            start, end_s = f.start_s, f.work_end_s
            end = t1 if end_s is None or not end_s < t1 else end_s
            overlap = end - (start if start > t0 else t0)
            if overlap <= 0.0 and not (start == end_s and t0 < start <= t1):
                continue
            if not work:
                last = f.last_token_s  # a stream gone silent is no longer in flight on it
                if last is not None and t0 - last >= SILENT_AFTER_S and _silent(f, t0):
                    continue
                weights[rid] = MIN_SPAN_S if overlap < MIN_SPAN_S else overlap
                continue
            weights[rid] = work_of(device, f, t0, t1, overlap)
        if work and weights and sum(weights.values()) <= 0.0:
            # No request claims work in this interval: split it by time, except to streams that
            # went silent (their upstream died or hangs); with none left it is unattributed.
            for rid in list(weights):
                f = flights[rid]
                if _silent(f, t0):
                    del weights[rid]
                    continue
                end = t1 if f.work_end_s is None else min(t1, f.work_end_s)
                weights[rid] = max(end - max(t0, f.start_s), MIN_SPAN_S)
        return weights

    @staticmethod
    def _work(device: str, f: Flight, t0: float, t1: float, overlap: float) -> float:
        p = f.profile
        w = 0.0
        start = f.start_s
        # prefill: each request's prefill work is weighed once in total on each device, spread
        # over start -> first byte; until the first byte, at an assumed prefill speed, so that
        # a request merely queued weighs in an interval at most the prefill it could have done
        # in it (its overlap at ASSUMED_PREFILL_TOKENS_PER_S), never its whole prompt
        total = p.prefill_j_per_token * p.prompt_tokens
        done = f._prefill_weighed.get(device, 0.0)
        if done < total:
            fb = f.first_byte_s
            if fb is not None and fb <= t1:
                f._prefill_weighed[device] = total
                w += total - done
            elif fb is not None:
                span = fb - start
                add = total * overlap / (MIN_SPAN_S if span < MIN_SPAN_S else span)
                add = total - done if add > total - done else add
                f._prefill_weighed[device] = done + add
                w += add
            else:
                expected_s = p.prompt_tokens / ASSUMED_PREFILL_TOKENS_PER_S
                elapsed_s = t1 - start
                expected_s = elapsed_s if elapsed_s > expected_s else expected_s
                share = MIN_SPAN_S if overlap < MIN_SPAN_S else overlap
                add = total * share / (MIN_SPAN_S if expected_s < MIN_SPAN_S else expected_s)
                add = total - done if add > total - done else add
                f._prefill_weighed[device] = done + add
                w += add
        end_s, work_end = f.end_s, f.work_end_s
        if p.token_stream:
            weighed = f._tokens_weighed
            decoded = f.decoded_tokens
            w += p.decode_j_per_token * (decoded - weighed.get(device, 0.0))
            weighed[device] = decoded
            if end_s is not None and work_end is not None and work_end > end_s:
                # an aborted request's generation goes on at the speed it streamed
                lo = t0 if t0 > end_s else end_s
                hi = t1 if t1 < work_end else work_end
                if hi > lo:
                    w += p.decode_j_per_token * f.linger_tokens_per_s * (hi - lo)
        else:
            span = (t1 if work_end is None else work_end) - start
            span = MIN_SPAN_S if span < MIN_SPAN_S else span
            share = MIN_SPAN_S if overlap < MIN_SPAN_S else overlap
            w += p.expected_j * share / span
        return w

    def _idle_now_w(self, totals: DeviceTotals) -> float:
        """The idle power as it stands (fixed, learned, or the lowest power seen)."""
        if self.fixed_idle_power_w is not None:
            return self.fixed_idle_power_w
        if totals.idle_power_w is not None:
            return totals.idle_power_w
        return totals.min_power_w or 0.0

    def _idle_power_w(
        self, totals: DeviceTotals, energy_j: float, duration_s: float, quiet: bool
    ) -> float:
        if duration_s > 0.0:
            power_w = energy_j / duration_s
            if totals.min_power_w is None or power_w < totals.min_power_w:
                totals.min_power_w = power_w
            if quiet:
                prev = totals.idle_power_w
                totals.idle_power_w = (
                    power_w if prev is None else prev + IDLE_EMA_ALPHA * (power_w - prev)
                )
        return self._idle_now_w(totals)

    @staticmethod
    def _book(totals: DeviceTotals, split: IntervalSplit, energy_j: float) -> None:
        totals.measured_j += energy_j
        totals.attributed_j += sum(split.attributed_j.values())
        totals.idle_j += split.idle_j
        totals.no_requests_j += split.no_requests_j

    def _close(self, device: str, flights: dict[str, Flight], t_s: float) -> list[Flight]:
        done: list[Flight] = []
        ended = [
            rid for rid, f in flights.items() if f.work_end_s is not None and f.work_end_s <= t_s
        ]
        for rid in ended:
            f = flights.pop(rid)
            f._open_on.discard(device)
            if not f._open_on:
                self._flights.pop(rid, None)
                self._lingering.pop(rid, None)
                done.append(f)
        return done
