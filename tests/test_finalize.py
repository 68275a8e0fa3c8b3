"""``proxy.finalize``: what a finished request is charged and on what basis, as a table of cases
(record as it ended, its flight, and the record that comes out). Pure: no engine, no meter."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from estimators.attribution import Flight, WorkProfile
from estimators.estimator import Estimate
from proxy.finalize import finalize, no_work
from proxy.records import RequestRecord

ESTIMATE = Estimate(energy_j=42.0, basis="task prior for text-generation", method="prior")
G_PER_J = 0.001


def flight(
    energy_j: float = 10.0, gaps: int = 0, end_s: float = 1.0, work_end_s: float = 1.0
) -> Flight:
    f = Flight("r", ("gpu0",), 0.0, WorkProfile(), end_s=end_s, work_end_s=work_end_s)
    f.energy_j, f.co2e_g, f.gaps = energy_j, energy_j * 0.002, gaps
    return f


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    outcome: str
    answered: bool
    flight: Flight | None
    source: str
    energy_j: float
    basis: str
    task: str = "text-generation"
    estimated: bool = False  # the estimate was asked for
    extra: tuple[tuple[str, object], ...] = ()


CASES = [
    Case("measured whole", 200, "ok", True, flight(), "measured", 10.0, "measured"),
    Case(
        "a 500 after work is measured",
        500,
        "upstream_error",
        True,
        flight(),
        "measured",
        10.0,
        "measured",
    ),
    Case(
        "a meter gap: estimated",
        200,
        "ok",
        True,
        flight(gaps=1),
        "estimated",
        42.0,
        ESTIMATE.basis,
        estimated=True,
        extra=(("estimate_method", "prior"),),
    ),
    Case(
        "no metered device: estimated",
        200,
        "ok",
        True,
        None,
        "estimated",
        42.0,
        ESTIMATE.basis,
        estimated=True,
        extra=(("estimate_method", "prior"),),
    ),
    Case(
        "an aborted generation charged while its server finished it",
        200,
        "client_disconnect",
        True,
        flight(work_end_s=3.0),
        "measured",
        10.0,
        "measured; the client left before its generation was complete, so it is charged "
        "until its expected remaining work was done (2.0 s after it ended)",
        extra=(("linger_s", 2.0),),
    ),
    Case(
        "another task than inference",
        200,
        "ok",
        True,
        None,
        "estimated",
        0.0,
        "no inference",
        task="other",
    ),
    Case(
        "never reached the upstream",
        502,
        "upstream_unavailable",
        False,
        None,
        "estimated",
        0.0,
        "not served upstream",
    ),
    Case(
        "a body too large",
        413,
        "payload_too_large",
        False,
        None,
        "estimated",
        0.0,
        "not served upstream",
    ),
    Case(
        "a 404 measured before its answer",
        404,
        "ok",
        True,
        flight(energy_j=3.0),
        "measured",
        3.0,
        "no work upstream (HTTP 404): not charged from its answer on, only its share measured "
        "before its answer, while the upstream held it",
    ),
    Case(
        "a 404 unmetered",
        404,
        "ok",
        True,
        None,
        "estimated",
        0.0,
        "no work upstream (HTTP 404): not charged",
    ),
    Case(
        "the proxy's 504 before any answer",
        504,
        "upstream_timeout",
        False,
        flight(gaps=2),
        "estimated",
        0.0,
        "no work upstream (HTTP 504): not charged",
    ),
    Case(
        "a 504 after the answer began did work",
        504,
        "upstream_timeout",
        True,
        flight(),
        "measured",
        10.0,
        "measured",
    ),
    Case(
        "a client gone before the answer (502 placeholder) is an abort, not an answer",
        502,
        "client_disconnect",
        False,
        flight(),
        "measured",
        10.0,
        "measured",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_finalize(case: Case) -> None:
    rec = RequestRecord("r", "alice", None, "llm", "llama", case.task, case.status, "t")
    rec.outcome = case.outcome
    rec.ttfb_s = 0.1 if case.answered else None
    asked: list[bool] = []

    def estimate() -> Estimate:
        asked.append(True)
        return ESTIMATE

    out = finalize(rec, case.flight, estimate, G_PER_J)
    assert out is rec and out.final is True
    assert (out.source, out.energy_j, out.basis) == (case.source, case.energy_j, case.basis)
    if case.estimated:
        assert out.co2e_g == pytest.approx(42.0 * G_PER_J)
    elif case.flight is not None and case.source == "measured":
        assert out.co2e_g == case.flight.co2e_g
    else:
        assert out.co2e_g == 0.0
    assert bool(asked) is case.estimated  # estimated only when it must be
    assert dict(case.extra) == {k: out.extra[k] for k in dict(case.extra)}


@pytest.mark.parametrize(
    ("status", "outcome", "answered", "expected"),
    [
        (200, "ok", True, False),
        (400, "ok", True, True),
        (429, "ok", True, True),
        (500, "upstream_error", True, False),
        (502, "ok", True, True),
        (502, "upstream_unavailable", False, True),
        (502, "client_disconnect", False, False),
        (502, "cancelled", False, False),
        (504, "upstream_timeout", False, True),
        (504, "upstream_timeout", True, False),
        (504, "ok", True, False),
    ],
)
def test_no_work(status: int, outcome: str, answered: bool, expected: bool) -> None:
    assert no_work(status, outcome, answered) is expected
