"""How close ``work`` and ``time`` weighting come to each request's true energy.

A simulated device runs a batch of overlapping LLM requests of two kinds: prefill-heavy (long
prompts, few output tokens) and decode-heavy (short prompts, many output tokens). Its true
energy is known exactly: idle watts, plus for each request ``prefill_j_per_token * prompt_tokens``
spread evenly over its prefill phase (start -> first token), plus ``decode_j_per_token`` at each
emitted token's time. Every request's true per-token costs differ from the fleet mean by up to
+-20 %, as they do between real requests.

The meter reports the device's energy every 100 ms; the proxy-side events (start, first byte,
one ``tokens`` call per streamed token, end) go to ``AttributionEngine`` in time order, exactly
as ``proxy.accounting`` feeds it. The engine knows the idle power; the work profile carries the
estimator's per-token costs (the fleet means, or means that are off by a factor to show what a
poor prior does). The result is the per-request mean absolute percentage error (MAPE) of the
attributed energy against the truth.

A second case, "abort, then a new request", follows a single-slot server (llama.cpp): request A
streams until its client aborts at t=1 s, but the server finishes A's generation (until t=7 s,
unseen by the proxy); request B arrives at t=1.5 s, waits for the slot, prefills over 7.0-7.2 s
and streams. The truth charges A its whole generation and B only its own work; the engine learns
of A's remaining work only from its ``max_tokens`` and the speed it streamed at
(``abort_linger``, as ``proxy.accounting`` does).

Run: ``python -m bench.attribution_accuracy`` (deterministic for a given ``--seed``).
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from estimators.attribution import (
    AttributionEngine,
    IdlePolicy,
    Weighting,
    WorkProfile,
    abort_linger,
)
from estimators.estimator import Estimator, RequestShape

DEVICE = "gpu0"
SAMPLE_S = 0.1  # meter interval
IDLE_W = 60.0
PREFILL_J_PER_TOKEN = 0.01  # fleet mean, joules per prompt token
DECODE_J_PER_TOKEN = 0.3  # fleet mean, joules per generated token
PREFILL_TOKENS_PER_S = 8000.0
COST_SPREAD = 0.2  # each request's true costs are the mean times U(1 - s, 1 + s)
START, FIRST_BYTE, TOKEN, END, SAMPLE = range(5)  # event order at equal times


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request's true shape and costs (seconds, tokens, joules per token)."""

    rid: str
    kind: str  # "prefill-heavy" or "decode-heavy"
    start_s: float
    prompt_tokens: int
    token_times_s: tuple[float, ...]
    prefill_j_per_token: float
    decode_j_per_token: float
    #: when its prefill really began (later than its start when it waited in a queue)
    prefill_start_s: float | None = None
    #: when its client aborted: the proxy sees its tokens until then, the device all of them
    abort_s: float | None = None
    max_tokens: int | None = None

    @property
    def first_token_s(self) -> float:
        return self.token_times_s[0]

    @property
    def seen_token_times_s(self) -> tuple[float, ...]:
        """The tokens the proxy relayed (all of them unless its client aborted)."""
        if self.abort_s is None:
            return self.token_times_s
        return tuple(t for t in self.token_times_s if t <= self.abort_s)

    @property
    def end_s(self) -> float:
        return self.token_times_s[-1]

    @property
    def true_j(self) -> float:
        """Its dynamic energy (idle excluded): what the engine should attribute to it."""
        return self.prefill_j_per_token * self.prompt_tokens + self.decode_j_per_token * len(
            self.token_times_s
        )


def workload(seed: int = 7, requests: int = 240, rate_per_s: float = 6.0) -> list[SimRequest]:
    """Poisson arrivals, half prefill-heavy and half decode-heavy, overlapping in one batch."""
    rng = random.Random(seed)
    out: list[SimRequest] = []
    t = 0.0
    for i in range(requests):
        t += rng.expovariate(rate_per_s)
        if rng.random() < 0.5:
            kind, prompt, tokens = "prefill-heavy", rng.randint(1500, 6000), rng.randint(4, 24)
        else:
            kind, prompt, tokens = "decode-heavy", rng.randint(20, 200), rng.randint(150, 600)
        prefill_s = prompt / PREFILL_TOKENS_PER_S
        itl_s = rng.uniform(0.02, 0.04)  # inter-token latency under load
        first = t + prefill_s
        times = tuple(first + k * itl_s for k in range(tokens))
        out.append(
            SimRequest(
                rid=f"r{i}",
                kind=kind,
                start_s=t,
                prompt_tokens=prompt,
                token_times_s=times,
                prefill_j_per_token=PREFILL_J_PER_TOKEN
                * rng.uniform(1 - COST_SPREAD, 1 + COST_SPREAD),
                decode_j_per_token=DECODE_J_PER_TOKEN
                * rng.uniform(1 - COST_SPREAD, 1 + COST_SPREAD),
            )
        )
    return out


def interval_energy_j(reqs: Sequence[SimRequest], n_intervals: int) -> list[float]:
    """True device energy of each meter interval ``(k*SAMPLE_S, (k+1)*SAMPLE_S]``."""
    energy = [IDLE_W * SAMPLE_S] * n_intervals
    for r in reqs:
        # prefill: spread evenly over [start (or when it left the queue), first token]
        a = r.start_s if r.prefill_start_s is None else r.prefill_start_s
        b = r.first_token_s
        rate_w = r.prefill_j_per_token * r.prompt_tokens / (b - a)
        for k in range(int(a // SAMPLE_S), min(n_intervals, int(b // SAMPLE_S) + 1)):
            lo, hi = max(a, k * SAMPLE_S), min(b, (k + 1) * SAMPLE_S)
            if hi > lo:
                energy[k] += rate_w * (hi - lo)
        # decode: each token's energy at the time it is emitted
        for t in r.token_times_s:
            energy[math.ceil(t / SAMPLE_S) - 1] += r.decode_j_per_token
    return energy


@dataclass(frozen=True, slots=True)
class Accuracy:
    label: str
    mape_pct: float
    mape_prefill_heavy_pct: float
    mape_decode_heavy_pct: float
    measured_j: float
    attributed_j: float
    unattributed_j: float
    conservation_error_j: float  # measured - attributed - unattributed
    per_request_sum_error_j: float  # sum of final request energies - attributed


def attribute(
    reqs: Sequence[SimRequest],
    weighting: Weighting,
    prefill_factor: float = 1.0,
    decode_factor: float = 1.0,
    label: str = "",
    engine_cls: type[AttributionEngine] = AttributionEngine,
) -> Accuracy:
    """Feed the engine in time order and compare what it attributed with the truth.

    Args:
        prefill_factor, decode_factor: how far the estimator's per-token costs are from the
            fleet means (1.0: right on average).
        engine_cls: the engine class (a subclass, to try another rule).
    """
    final, engine = run_engine(reqs, weighting, prefill_factor, decode_factor, engine_cls)
    totals = engine.devices[DEVICE]
    errors: dict[str, list[float]] = {"prefill-heavy": [], "decode-heavy": []}
    for r in reqs:
        errors[r.kind].append(abs(final[r.rid] - r.true_j) / r.true_j * 100.0)
    every = errors["prefill-heavy"] + errors["decode-heavy"]
    return Accuracy(
        label=label or weighting.value,
        mape_pct=sum(every) / len(every),
        mape_prefill_heavy_pct=_mean(errors["prefill-heavy"]),
        mape_decode_heavy_pct=_mean(errors["decode-heavy"]),
        measured_j=totals.measured_j,
        attributed_j=totals.attributed_j,
        unattributed_j=totals.unattributed_j,
        conservation_error_j=totals.measured_j - totals.attributed_j - totals.unattributed_j,
        per_request_sum_error_j=sum(final.values()) - totals.attributed_j,
    )


def run_engine(
    reqs: Sequence[SimRequest],
    weighting: Weighting,
    prefill_factor: float = 1.0,
    decode_factor: float = 1.0,
    engine_cls: type[AttributionEngine] = AttributionEngine,
    linger: bool = True,
) -> tuple[dict[str, float], AttributionEngine]:
    """Replay the proxy-side events and the meter's samples through an engine, in time order.
    Returns each request's final joules and the engine. ``linger=False`` closes an aborted
    request at its abort, as the engine did before aborted work was kept with its request."""
    end_s = max(r.end_s for r in reqs) + 2 * SAMPLE_S
    n = math.ceil(end_s / SAMPLE_S)
    energy = interval_energy_j(reqs, n)
    # (time, order, request, interval): at equal times request events come before the sample
    events: list[tuple[float, int, SimRequest | None, int]] = []
    for r in reqs:
        seen = r.seen_token_times_s
        events.append((r.start_s, START, r, -1))
        if seen:
            events.append((seen[0], FIRST_BYTE, r, -1))
        events.extend((t, TOKEN, r, -1) for t in seen)
        events.append((r.end_s if r.abort_s is None else r.abort_s, END, r, -1))
    events.extend(((k + 1) * SAMPLE_S, SAMPLE, None, k) for k in range(n))
    events.sort(key=lambda e: (e[0], e[1]))
    engine = engine_cls(weighting, IdlePolicy.EXCLUDE, IDLE_W)
    engine.sample(DEVICE, 0.0, 0.0)
    final: dict[str, float] = {}
    for t, order, req, k in events:
        if req is None:
            _, flights = engine.sample(DEVICE, t, energy[k])
            final.update((f.request_id, f.energy_j) for f in flights)
        elif order == START:
            profile = WorkProfile(
                prompt_tokens=float(req.prompt_tokens),
                prefill_j_per_token=PREFILL_J_PER_TOKEN * prefill_factor,
                decode_j_per_token=DECODE_J_PER_TOKEN * decode_factor,
                expected_j=1.0,
                token_stream=True,
            )
            engine.start(req.rid, [DEVICE], t, profile)
        elif order == FIRST_BYTE:
            engine.first_byte(req.rid, t)
        elif order == TOKEN:
            engine.tokens(req.rid, 1, t)
        elif req.abort_s is not None and linger:
            # as proxy.accounting: the estimator's expected length, the speed it streamed at
            seen = req.seen_token_times_s
            shape = RequestShape("sim", None, "text-generation", completion_tokens=req.max_tokens)
            expected = Estimator().expected_completion_tokens(shape)
            plan = abort_linger(
                len(seen), expected, seen[0] if seen else None, seen[-1] if seen else None
            )
            engine.end(req.rid, t, plan)
        else:
            engine.end(req.rid, t)
    return final, engine


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def compare(seed: int = 7, requests: int = 240) -> list[Accuracy]:
    """Time weighting; work weighting with right mean costs, and with costs off by 2x and 0.6x
    (the prefill:decode ratio wrong by 3.3x)."""
    reqs = workload(seed, requests)
    return [
        attribute(reqs, Weighting.TIME, label="time"),
        attribute(reqs, Weighting.WORK, label="work (mean costs)"),
        attribute(reqs, Weighting.WORK, 2.0, 0.6, label="work (prefill x2, decode x0.6)"),
    ]


@dataclass(frozen=True, slots=True)
class AbortCase:
    """Per-request error of the "abort, then a new request" case under one rule."""

    label: str
    aborted_error_pct: float  # A, signed: attributed vs true
    queued_error_pct: float  # B, signed
    conservation_error_j: float


def abort_then_new_request() -> list[SimRequest]:
    """A: 500-token prompt, 140 tokens at 20 tokens/s from t=0.05 (last at 7.0 s), client abort
    at t=1 s after 20 of them. B: arrives at t=1.5 s, waits for the slot until A's generation
    ends, prefills 1,000 tokens over 7.0-7.2 s, then 40 tokens at 20 tokens/s. Mean costs."""
    itl_s = 0.05
    a_times = tuple(round(0.05 + k * itl_s, 6) for k in range(140))
    b_times = tuple(round(7.2 + k * itl_s, 6) for k in range(40))
    return [
        SimRequest(
            "A",
            "decode-heavy",
            0.0,
            500,
            a_times,
            PREFILL_J_PER_TOKEN,
            DECODE_J_PER_TOKEN,
            abort_s=1.0,
            max_tokens=140,
        ),
        SimRequest(
            "B",
            "prefill-heavy",
            1.5,
            1000,
            b_times,
            PREFILL_J_PER_TOKEN,
            DECODE_J_PER_TOKEN,
            prefill_start_s=7.0,
        ),
    ]


def compare_abort() -> list[AbortCase]:
    """Time and work weighting on the abort case, and work weighting as the engine was before
    an aborted request's remaining work stayed with it (closed at the abort)."""
    reqs = abort_then_new_request()
    rows = []
    for label, weighting, linger in (
        ("time", Weighting.TIME, True),
        ("work", Weighting.WORK, True),
        ("work, aborted request closed at the abort (before)", Weighting.WORK, False),
    ):
        final, engine = run_engine(reqs, weighting, linger=linger)
        totals = engine.devices[DEVICE]
        a, b = reqs
        rows.append(
            AbortCase(
                label,
                (final[a.rid] - a.true_j) / a.true_j * 100.0,
                (final[b.rid] - b.true_j) / b.true_j * 100.0,
                totals.measured_j - totals.attributed_j - totals.unattributed_j,
            )
        )
    return rows


def markdown_abort(rows: Sequence[AbortCase]) -> str:
    lines = [
        "Abort, then a new request (single-slot server): A aborted at 1 s, its generation goes "
        "on until 7 s; B queued from 1.5 s, works 7.0-9.2 s. Error of each request's energy "
        "(attributed vs true).",
        "",
        "| rule | A (aborted) | B (queued behind it) | conservation error (J) |",
        "|---|---:|---:|---:|",
    ]
    for c in rows:
        lines.append(
            f"| {c.label} | {c.aborted_error_pct:+.1f} % | {c.queued_error_pct:+.1f} % | "
            f"{c.conservation_error_j:.2e} |"
        )
    return "\n".join(lines)


def markdown(rows: Sequence[Accuracy], seed: int, requests: int) -> str:
    lines = [
        f"Simulated device, {requests} overlapping requests (seed {seed}), meter every "
        f"{SAMPLE_S * 1000:.0f} ms, idle {IDLE_W:.0f} W excluded.",
        "",
        "| weighting | MAPE, all | prefill-heavy | decode-heavy | conservation error (J) |",
        "|---|---:|---:|---:|---:|",
    ]
    for a in rows:
        lines.append(
            f"| {a.label} | {a.mape_pct:.1f} % | {a.mape_prefill_heavy_pct:.1f} % | "
            f"{a.mape_decode_heavy_pct:.1f} % | {a.conservation_error_j:.2e} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--requests", type=int, default=240)
    args = p.parse_args()
    print(markdown(compare(args.seed, args.requests), args.seed, args.requests))
    print()
    print(markdown_abort(compare_abort()))


if __name__ == "__main__":
    main()
