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
)

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

    @property
    def first_token_s(self) -> float:
        return self.token_times_s[0]

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
        # prefill: spread evenly over [start, first token]
        a, b = r.start_s, r.first_token_s
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
    end_s = max(r.end_s for r in reqs) + 2 * SAMPLE_S
    n = math.ceil(end_s / SAMPLE_S)
    energy = interval_energy_j(reqs, n)
    # (time, order, request, interval): at equal times request events come before the sample
    events: list[tuple[float, int, SimRequest | None, int]] = []
    for r in reqs:
        events.append((r.start_s, START, r, -1))
        events.append((r.first_token_s, FIRST_BYTE, r, -1))
        events.extend((t, TOKEN, r, -1) for t in r.token_times_s)
        events.append((r.end_s, END, r, -1))
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
            engine.tokens(req.rid, 1)
        else:
            engine.end(req.rid, t)
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


if __name__ == "__main__":
    main()
