"""What a finished request is charged, and on what basis: measured, estimated or not charged.

Pure: the record, its flight in the attribution engine (``None`` when it had no metered device,
or the meter gave up on it) and its estimate in, the record with its charge out. No metrics,
no I/O; the accountant calls it once per request, when the meter has sampled past its end.

An answer for which the upstream did no inference (a 4xx, a 502, the proxy's own 504 before any
response: ``no_work``) is charged nothing from its answer on: its share of the interval of its
answer and of later ones goes to the requests that did work. What the meter had split while the
upstream held it, before the answer, stays charged (the engine splits each interval once); its
basis says so.
"""

from __future__ import annotations

from collections.abc import Callable

from estimators.attribution import Flight
from estimators.estimator import Estimate
from proxy.records import RequestRecord
from proxy.tasks import OTHER

#: Outcomes where the upstream never got the request: nothing to estimate.
NOT_SERVED = frozenset(("upstream_unavailable", "payload_too_large", "client_timeout"))
#: Outcomes where the client left (or the proxy stopped it) while the upstream had the request:
#: its server may go on computing it.
ABORTED = frozenset(("client_disconnect", "cancelled", "proxy_restart"))
#: The basis of a request measured whole: the only kind the estimator calibrates on.
MEASURED = "measured"


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


def finalize(
    record: RequestRecord,
    flight: Flight | None,
    estimate: Callable[[], Estimate],
    g_per_j: float,
    water_l_per_j: float | None = None,
) -> RequestRecord:
    """Set ``record``'s energy, CO2e, source and basis, mark it final and return it (the same
    object: a record is finalized once).

    Args:
        record: the ended request (status, outcome and ``ttfb_s`` set: an answer had arrived
            when ``ttfb_s`` is not None).
        flight: its flight, ``None`` when no meter read its devices.
        estimate: its estimate, called only when its energy must be estimated.
        g_per_j: grams CO2e per joule now, for an estimate's CO2e.
        water_l_per_j: litres of water per joule, or ``None`` when water is not configured.

    Embodied grams are the flight's (its share of its devices' time, whatever its energy's
    basis: the engine split them once); ``None`` without a flight on a device with figures.
    Water follows the energy charged.
    """
    rec = record
    if rec.task == OTHER or (flight is None and rec.outcome in NOT_SERVED):
        rec.energy_j, rec.co2e_g, rec.source = 0.0, 0.0, "estimated"
        rec.basis = "no inference" if rec.task == OTHER else "not served upstream"
    elif no_work(rec.status, rec.outcome, rec.ttfb_s is not None):
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
            rec.basis = MEASURED
    else:
        est = estimate()
        rec.energy_j = est.energy_j
        rec.co2e_g = est.energy_j * g_per_j
        rec.source = "estimated"
        rec.basis = est.basis
        rec.extra["estimate_method"] = est.method
    rec.embodied_co2e_g = flight.embodied_g if flight is not None else None
    rec.water_l = rec.energy_j * water_l_per_j if water_l_per_j is not None else None
    rec.final = True
    return rec
