"""The attribution engine: per device, attributed + unattributed == measured, always."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.attribution import (
    ASSUMED_DECODE_TOKENS_PER_S,
    MAX_LINGER_S,
    SILENT_AFTER_S,
    AttributionEngine,
    IdlePolicy,
    Weighting,
    WorkProfile,
    abort_linger,
    split_interval,
)

REL = 1e-6


def assert_conserved(engine: AttributionEngine, flights_j: dict[str, float]) -> None:
    for device, t in engine.devices.items():
        total = t.attributed_j + t.idle_j + t.no_requests_j
        assert math.isclose(total, t.measured_j, rel_tol=REL, abs_tol=1e-9), device
    charged = sum(flights_j.values())
    attributed = sum(t.attributed_j for t in engine.devices.values())
    assert math.isclose(charged, attributed, rel_tol=REL, abs_tol=1e-9)


# -- split_interval ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("energy", "duration", "weights", "idle_w", "policy", "expected", "idle", "none"),
    [
        (10.0, 1.0, {}, 0.0, IdlePolicy.EXCLUDE, {}, 0.0, 10.0),
        (10.0, 1.0, {"a": 1.0}, 4.0, IdlePolicy.EXCLUDE, {"a": 6.0}, 4.0, 0.0),
        (10.0, 1.0, {"a": 1.0}, 4.0, IdlePolicy.INCLUDE, {"a": 10.0}, 0.0, 0.0),
        (10.0, 1.0, {"a": 1.0, "b": 3.0}, 2.0, IdlePolicy.EXCLUDE, {"a": 2.0, "b": 6.0}, 2.0, 0),
        (3.0, 1.0, {"a": 1.0}, 5.0, IdlePolicy.EXCLUDE, {}, 3.0, 0.0),  # idle caps at energy
        (6.0, 1.0, {"a": 0.0, "b": 0.0}, 0.0, IdlePolicy.EXCLUDE, {"a": 3.0, "b": 3.0}, 0, 0),
        (0.0, 1.0, {"a": 1.0}, 0.0, IdlePolicy.EXCLUDE, {"a": 0.0}, 0.0, 0.0),
    ],
)
def test_split_interval_table(
    energy: float,
    duration: float,
    weights: dict[str, float],
    idle_w: float,
    policy: IdlePolicy,
    expected: dict[str, float],
    idle: float,
    none: float,
) -> None:
    split = split_interval(energy, duration, weights, idle_w, policy)
    got = {k: v for k, v in split.attributed_j.items() if v or k in expected}
    assert got == pytest.approx(expected)
    assert split.idle_j == pytest.approx(idle)
    assert split.no_requests_j == pytest.approx(none)


@given(
    energy=st.floats(0, 1e6),
    duration=st.floats(0, 10),
    weights=st.dictionaries(st.text(min_size=1, max_size=4), st.floats(0, 1e6), max_size=20),
    idle_w=st.floats(0, 1e4),
    policy=st.sampled_from(list(IdlePolicy)),
)
def test_split_interval_conserves(
    energy: float,
    duration: float,
    weights: dict[str, float],
    idle_w: float,
    policy: IdlePolicy,
) -> None:
    split = split_interval(energy, duration, weights, idle_w, policy)
    total = sum(split.attributed_j.values()) + split.idle_j + split.no_requests_j
    assert math.isclose(total, energy, rel_tol=REL, abs_tol=1e-9)
    assert all(v >= 0 for v in split.attributed_j.values())


# -- the engine under random interleavings -------------------------------------------------

event = st.tuples(
    st.sampled_from(
        ["start", "first_byte", "tokens", "end", "abort", "no_work", "sample", "prompt"]
    ),
    st.integers(0, 7),  # request index
    st.floats(0.0, 0.5),  # time step
    st.floats(0.0, 500.0),  # energy or tokens
    st.sampled_from(["gpu0", "gpu1"]),
)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(event, max_size=80),
    weighting=st.sampled_from(list(Weighting)),
    idle=st.sampled_from(list(IdlePolicy)),
    idle_w=st.one_of(st.none(), st.floats(0, 300)),
)
def test_invariant_under_any_interleaving(
    events: list[tuple[str, int, float, float, str]],
    weighting: Weighting,
    idle: IdlePolicy,
    idle_w: float | None,
) -> None:
    engine = AttributionEngine(weighting, idle, idle_w)
    t = 0.0
    started: dict[str, bool] = {}
    finals: dict[str, float] = {}
    uncharged: dict[str, float] = {}  # answers without upstream work: energy at their end
    for kind, i, dt, value, device in events:
        t += dt
        rid = f"r{i}"
        if kind == "start" and rid not in started:
            devices = ["gpu0", "gpu1"] if i % 3 == 0 else [device]
            profile = WorkProfile(value, 0.1, 1.0, value + 1.0, token_stream=i % 2 == 0)
            engine.start(rid, devices, t, profile)
            started[rid] = False
        elif kind == "first_byte":
            engine.first_byte(rid, t)
        elif kind == "tokens":
            engine.tokens(rid, int(value) % 7, t if i % 2 == 0 else None)
        elif kind == "prompt":
            engine.set_prompt_tokens(rid, value)
        elif kind in ("end", "abort", "no_work") and rid in started and not started[rid]:
            # an aborted request lingers while its expected remaining work goes on; an answer
            # without upstream work gets nothing from its end on
            linger = abort_linger(value % 40, 40, 0.0, dt) if kind == "abort" else None
            flight = engine.end(rid, t, linger, charge=kind != "no_work")
            if kind == "no_work" and flight is not None:
                uncharged[rid] = flight.energy_j
            started[rid] = True
        elif kind == "sample":
            _, done = engine.sample(device, t, value, g_per_j=0.001)
            for f in done:
                assert f.final
                assert f.request_id not in finals, "a request finalized twice"
                finals[f.request_id] = f.energy_j
    in_flight = {rid: f.energy_j for rid, f in engine._flights.items()}
    assert not set(in_flight) & set(finals)
    assert_conserved(engine, {**finals, **in_flight})
    for f in engine._flights.values():
        assert f.energy_j >= 0
    # nothing lingers for ever: past the longest linger, every ended request is final
    later = t + MAX_LINGER_S + 1.0
    for device in ("gpu0", "gpu1"):
        _, done = engine.sample(device, later, 1.0)
        for f in done:
            assert f.request_id not in finals, "a request finalized twice"
            finals[f.request_id] = f.energy_j
    assert {rid for rid, ended in started.items() if ended} <= set(finals)
    in_flight = {rid: f.energy_j for rid, f in engine._flights.items()}
    assert_conserved(engine, {**finals, **in_flight})
    for rid, at_end_j in uncharged.items():
        assert finals[rid] == at_end_j, "an answer without upstream work was charged after it"


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    weighting=st.sampled_from(list(Weighting)),
)
def test_order_independence(n: int, seed: int, weighting: Weighting) -> None:
    """The same requests registered in any order get the same joules."""
    rng = random.Random(seed)
    reqs = [
        (f"r{i}", rng.uniform(0, 1), rng.uniform(1.0, 3.0), rng.uniform(1, 500), rng.randint(0, 60))
        for i in range(n)
    ]
    samples = [(0.2 * k, rng.uniform(0, 400)) for k in range(1, 21)]

    def run(order: list[int]) -> dict[str, float]:
        engine = AttributionEngine(weighting, IdlePolicy.EXCLUDE, 30.0)
        engine.sample("gpu0", 0.0, 0.0)
        events: list[tuple[float, int, str, int]] = []
        for idx in order:
            _rid, start, end, _p, _tok = reqs[idx]
            events.append((start, 0, "start", idx))
            events.append((end, 2, "end", idx))
        for k, (ts, _e) in enumerate(samples):
            events.append((ts, 1, "sample", k))
        events.sort(key=lambda e: (e[0], e[1]))
        energies: dict[str, float] = {}
        for ts, _prio, kind, idx in events:
            if kind == "start":
                rid, _s, _e, prompt, tokens = reqs[idx]
                engine.start(rid, ["gpu0"], ts, WorkProfile(prompt, 0.1, 1.0, 5.0, tokens > 30))
                engine.first_byte(rid, ts + 0.1)
            elif kind == "end":
                rid, *_ = reqs[idx]
                engine.tokens(rid, reqs[idx][4])
                engine.end(rid, ts)
            else:
                _, done = engine.sample("gpu0", ts, samples[idx][1])
                energies.update({f.request_id: f.energy_j for f in done})
        energies.update({rid: f.energy_j for rid, f in engine._flights.items()})
        return energies

    order = list(range(n))
    shuffled = order[:]
    rng.shuffle(shuffled)
    a, b = run(order), run(shuffled)
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid] == pytest.approx(b[rid], rel=1e-9, abs=1e-9)


# -- specific behaviours -------------------------------------------------------------------


def test_time_weighting_splits_by_overlap() -> None:
    engine = AttributionEngine(Weighting.TIME, IdlePolicy.INCLUDE)
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("a", ["gpu0"], 0.0, WorkProfile())
    engine.start("b", ["gpu0"], 0.5, WorkProfile())
    _, done = engine.sample("gpu0", 1.0, 150.0)
    assert done == []
    assert engine.flight("a").energy_j == pytest.approx(100.0)  # 1.0 s of 1.5 s
    assert engine.flight("b").energy_j == pytest.approx(50.0)


def test_request_final_only_after_a_sample_covers_its_end() -> None:
    engine = AttributionEngine(Weighting.TIME, IdlePolicy.INCLUDE)
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("a", ["gpu0"], 0.1, WorkProfile())
    engine.end("a", 0.5)
    assert not engine.flight("a").final
    _, done = engine.sample("gpu0", 1.0, 90.0)
    assert [f.request_id for f in done] == ["a"]
    assert done[0].final
    assert done[0].energy_j == pytest.approx(90.0)  # alone: all of it, idle included
    assert engine.flight("a") is None


def test_multi_device_request_waits_for_every_device() -> None:
    engine = AttributionEngine(Weighting.TIME, IdlePolicy.INCLUDE)
    for d in ("gpu0", "gpu1"):
        engine.sample(d, 0.0, 0.0)
    engine.start("tp", ["gpu0", "gpu1"], 0.0, WorkProfile())
    engine.end("tp", 0.5)
    _, done = engine.sample("gpu0", 1.0, 10.0)
    assert done == []
    _, done = engine.sample("gpu1", 1.0, 30.0)
    assert [f.request_id for f in done] == ["tp"]
    assert done[0].energy_j == pytest.approx(40.0)


def test_idle_excluded_and_learned_from_quiet_intervals() -> None:
    engine = AttributionEngine(Weighting.TIME, IdlePolicy.EXCLUDE, idle_power_w=None)
    engine.sample("gpu0", 0.0, 0.0)
    engine.sample("gpu0", 1.0, 50.0)  # quiet: 50 W idle learned
    engine.start("a", ["gpu0"], 1.0, WorkProfile())
    engine.sample("gpu0", 2.0, 250.0)
    assert engine.flight("a").energy_j == pytest.approx(200.0)
    t = engine.devices["gpu0"]
    assert t.idle_j == pytest.approx(50.0)
    assert t.no_requests_j == pytest.approx(50.0)


def test_work_weighting_charges_decode_tokens_where_they_were_emitted() -> None:
    engine = AttributionEngine(Weighting.WORK, IdlePolicy.INCLUDE)
    engine.sample("gpu0", 0.0, 0.0)
    stream = WorkProfile(prompt_tokens=0, token_stream=True)
    engine.start("fast", ["gpu0"], 0.0, stream)
    engine.start("slow", ["gpu0"], 0.0, stream)
    engine.first_byte("fast", 0.0)
    engine.first_byte("slow", 0.0)
    engine.tokens("fast", 30)
    engine.tokens("slow", 10)
    engine.sample("gpu0", 1.0, 400.0)
    assert engine.flight("fast").energy_j == pytest.approx(300.0)
    assert engine.flight("slow").energy_j == pytest.approx(100.0)


def test_co2_uses_the_intensity_of_each_interval() -> None:
    engine = AttributionEngine(Weighting.TIME, IdlePolicy.INCLUDE)
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("a", ["gpu0"], 0.0, WorkProfile())
    engine.sample("gpu0", 1.0, 100.0, g_per_j=0.001)
    engine.sample("gpu0", 2.0, 100.0, g_per_j=0.003)
    assert engine.flight("a").co2e_g == pytest.approx(0.1 + 0.3)


def test_gap_marks_flights_and_drop_device_releases_ended_ones() -> None:
    engine = AttributionEngine()
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("a", ["gpu0"], 0.0, WorkProfile())
    engine.end("a", 0.5)
    engine.gap("gpu0", 1.0)
    assert engine.flight("a").gaps == 1
    done = engine.drop_device("gpu0", 6.0)
    assert [f.request_id for f in done] == ["a"]
    assert done[0].gaps >= 1


# -- an aborted request whose work goes on ---------------------------------------------------


def _abort_then_new_request(weighting: Weighting) -> tuple[AttributionEngine, dict[str, float]]:
    """A single-slot server (llama.cpp): A streams 20 tokens/s, its client aborts at t=1, and the
    server goes on generating A's tokens until t=7 (max_tokens 140). B arrives at t=1.5, waits
    for the slot, prefills 1,000 tokens over 7.0-7.2 and streams until t=9. The device draws
    60 W idle plus 200 W whenever it works (0-9 s). Returns the engine and the joules each
    request got inside 1-7 s."""
    engine = AttributionEngine(weighting, IdlePolicy.EXCLUDE, idle_power_w=60.0)
    stream = WorkProfile(100, 0.1, 1.0, 1.0, token_stream=True)
    engine.sample("gpu0", 0.0, 0.0)
    flights = {"A": engine.start("A", ["gpu0"], 0.0, stream)}
    events: list[tuple[float, int, str]] = [(0.05, 0, "A first byte")]
    events += [(round(0.05 * k, 2), 1, "A token") for k in range(1, 21)]  # 0.05 .. 1.0
    events += [(1.0, 2, "A aborted"), (1.5, 0, "B start"), (7.2, 0, "B first byte")]
    events += [(round(7.2 + 0.05 * k, 2), 1, "B token") for k in range(0, 37)]
    events += [(9.0, 2, "B end")]
    events += [(round(0.1 * k, 1), 3, "sample") for k in range(1, 121)]
    inside: dict[str, float] = {"A": 0.0, "B": 0.0}
    for t, _order, what in sorted(events):
        if what == "A first byte":
            engine.first_byte("A", t)
        elif what == "A token":
            engine.tokens("A", 1, t)
        elif what == "A aborted":
            linger = abort_linger(
                decoded_tokens=20, expected_tokens=140, first_byte_s=0.05, last_token_s=1.0
            )
            engine.end("A", t, linger=linger)
        elif what == "B start":
            b = WorkProfile(1000, 0.1, 1.0, 1.0, token_stream=True)
            flights["B"] = engine.start("B", ["gpu0"], t, b)
        elif what == "B first byte":
            engine.first_byte("B", t)
        elif what == "B token":
            engine.tokens("B", 1, t)
        elif what == "B end":
            engine.end("B", t)
        else:
            before = {rid: f.energy_j for rid, f in flights.items()}
            engine.sample("gpu0", t, 6.0 + (20.0 if t <= 9.0 + 1e-9 else 0.0))
            if 1.0 < t <= 7.0 + 1e-9:
                for rid, f in flights.items():
                    inside[rid] += f.energy_j - before[rid]
    return engine, inside


def test_an_aborted_request_keeps_the_energy_of_its_work_that_goes_on() -> None:
    """The server finishes A's generation after its client left: 1-7 s is A's work, not the
    queued request's (it was charged 94 % of that energy when A's flight closed at the abort)."""
    _engine, inside = _abort_then_new_request(Weighting.WORK)
    drawn_j = 60 * 20.0  # 200 W of work over 1-7 s
    assert inside["A"] >= 0.9 * drawn_j
    # B only waits: what it may get is its prompt's prefill at the assumed speed (0.2 s)
    assert inside["B"] <= 0.05 * drawn_j


def test_under_time_weighting_a_lingering_request_keeps_its_time_share() -> None:
    """Its tokens are no longer relayed, yet it is not a stream gone silent: its work goes on."""
    _engine, inside = _abort_then_new_request(Weighting.TIME)
    # 1.0-1.5 s alone, 1.5-7.0 s shared evenly with the queued request
    assert inside["A"] == pytest.approx(20.0 * (5 + 55 / 2), rel=0.02)


def test_an_aborted_request_is_final_only_when_its_remaining_work_is_done() -> None:
    engine = AttributionEngine(Weighting.WORK, IdlePolicy.EXCLUDE, idle_power_w=60.0)
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("A", ["gpu0"], 0.0, WorkProfile(10, 0.1, 1.0, 1.0, token_stream=True))
    engine.first_byte("A", 0.1)
    engine.tokens("A", 11)
    engine.end("A", 0.6, linger=abort_linger(11, 31, first_byte_s=0.1, last_token_s=0.6))
    finals: list[str] = []
    for k in range(1, 31):
        _, done = engine.sample("gpu0", 0.1 * k, 26.0)
        finals += [f"{f.request_id}@{k / 10:g}" for f in done]
    assert finals == ["A@1.6"]  # 20 tokens left at the 20 tokens/s it streamed: 0.6 + 1.0 s


def test_a_lingering_request_is_closed_when_its_device_goes_quiet() -> None:
    """vLLM stops an aborted request at once: the device falls back to idle, and the flight
    closes there instead of waiting out its expected work."""
    engine = AttributionEngine(Weighting.WORK, IdlePolicy.EXCLUDE, idle_power_w=60.0)
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("A", ["gpu0"], 0.0, WorkProfile(10, 0.1, 1.0, 1.0, token_stream=True))
    engine.first_byte("A", 0.1)
    engine.tokens("A", 11)
    engine.end("A", 0.6, linger=abort_linger(11, 500, first_byte_s=0.1, last_token_s=0.6))
    engine.sample("gpu0", 0.7, 26.0 * 7)
    _, done = engine.sample("gpu0", 0.8, 6.0)  # idle
    assert [f.request_id for f in done] == ["A"]
    assert done[0].energy_j == pytest.approx(20.0 * 7)


def test_abort_linger_uses_the_observed_decode_speed_and_is_capped() -> None:
    seen = abort_linger(21, 141, first_byte_s=0.0, last_token_s=1.0)
    assert seen is not None
    assert seen.tokens_per_s == pytest.approx(20.0)
    assert seen.duration_s == pytest.approx(6.0)
    assert abort_linger(141, 141, first_byte_s=0.0, last_token_s=7.0) is None  # done
    blind = abort_linger(0, 100, first_byte_s=None, last_token_s=None)  # before a token
    assert blind is not None
    assert blind.tokens_per_s == ASSUMED_DECODE_TOKENS_PER_S
    capped = abort_linger(2, 100_000, first_byte_s=0.0, last_token_s=1.0)
    assert capped is not None and capped.duration_s == MAX_LINGER_S


def test_a_queued_request_weighs_at_most_the_prefill_it_could_have_done() -> None:
    """While it waits for its first byte, a request with a long prompt weighs, per interval, its
    overlap's worth of prefill at ASSUMED_PREFILL_TOKENS_PER_S, not its whole prompt."""
    engine = AttributionEngine(Weighting.WORK, IdlePolicy.INCLUDE)
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("s", ["gpu0"], 0.0, WorkProfile(0, 0.1, 1.0, 1.0, token_stream=True))
    engine.first_byte("s", 0.0)
    engine.start("w", ["gpu0"], 0.05, WorkProfile(100_000, 0.1, 1.0, 1.0, token_stream=True))
    engine.tokens("s", 25)  # 25 J of decode work in the interval
    engine.sample("gpu0", 0.1, 100.0)
    # 0.05 s at 5,000 tokens/s: 250 prompt tokens x 0.1 J = 25 J of its 10,000 J prefill
    assert engine.flight("w").energy_j == pytest.approx(50.0)
    assert engine.flight("s").energy_j == pytest.approx(50.0)


@pytest.mark.parametrize("weighting", list(Weighting))
def test_a_stream_gone_silent_gets_no_share_of_the_fallback(weighting: Weighting) -> None:
    """A stream that sent tokens and then none for SILENT_AFTER_S (its upstream died or hangs)
    stops taking the time split (the fallback of work weighting, all of time weighting):
    energy no one claims is unattributed, not its."""
    engine = AttributionEngine(weighting, IdlePolicy.EXCLUDE, idle_power_w=60.0)
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("s", ["gpu0"], 0.0, WorkProfile(0, 0.1, 1.0, 1.0, token_stream=True))
    engine.first_byte("s", 0.05)
    engine.tokens("s", 4, t_s=0.1)
    for k in range(1, 51):
        engine.sample("gpu0", 0.1 * k, 21.0)  # 150 W over idle, every 0.1 s, for 5 s
    f = engine.flight("s")
    assert f is not None
    assert f.energy_j <= 150.0 * (0.1 + SILENT_AFTER_S + 0.1) + 1e-9  # 150 W over idle
    assert engine.devices["gpu0"].no_requests_j >= 150.0 * (5.0 - SILENT_AFTER_S - 0.3)


def test_intervals_with_requests_that_claim_nothing_are_not_learned_as_idle() -> None:
    """A silent stream or an answer without upstream work leaves an interval unclaimed: it is
    unattributed, but it is no quiet interval to learn the idle power from."""
    engine = AttributionEngine(Weighting.WORK, IdlePolicy.EXCLUDE, idle_power_w=None)
    engine.sample("gpu0", 0.0, 0.0)
    engine.sample("gpu0", 1.0, 60.0)  # quiet: 60 W idle learned
    engine.start("s", ["gpu0"], 1.0, WorkProfile(0, 0.1, 1.0, 1.0, token_stream=True))
    engine.first_byte("s", 1.0)
    engine.tokens("s", 4, t_s=1.0)
    engine.start("n", ["gpu0"], 1.0, WorkProfile(10, 0.1, 1.0, 1.0, token_stream=True))
    engine.end("n", 9.0, charge=False)
    for k in range(3, 9):
        engine.sample("gpu0", float(k), 260.0)  # busy, claimed by no one
    assert engine.devices["gpu0"].idle_power_w == pytest.approx(60.0)
