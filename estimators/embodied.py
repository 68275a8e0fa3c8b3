"""Embodied (manufacturing) emissions and water, per request.

A device's embodied kg CO2e is spread evenly over its lifetime: ``embodied_kg_co2e * 1000 /
lifetime_s`` grams per second. Each sample interval's embodied grams are split among the requests
in flight on the device by their share of the interval's device-seconds (time overlap; a request
on N devices is charged on each); the seconds no request was in flight are unattributed. Per
device, at every interval:

    rate_g_per_s * (t1 - t0) == sum(attributed_g) + unattributed_g      (to float rounding)

Water: litres = energy_kWh * (WUE on site + PUE * the grid's water intensity), both L/kWh.

Pure: no clock, no I/O beyond reading the shipped table ``devices.csv``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from estimators.shipped import shipped_rows
from estimators.units import J_PER_KWH

SECONDS_PER_YEAR = 365.25 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class TableEntry:
    """One row of ``devices.csv``: the figure, what it covers (``card``: the board alone;
    ``server-share``: a GPU's share of a server), the publication, its year and address, and
    how the figure was derived from it."""

    embodied_kg_co2e: float
    source: str
    scope: str
    year: int
    url: str
    derivation: str


@functools.cache
def device_table() -> dict[str, TableEntry]:
    """The shipped table of embodied figures by device model (upper-cased), with sources."""
    return {
        row["model"].upper(): TableEntry(
            embodied_kg_co2e=float(row["embodied_kg_co2e"]),
            source=row["source"],
            scope=row["scope"],
            year=int(row["year"]),
            url=row["url"],
            derivation=row["derivation"],
        )
        for row in shipped_rows("estimators", "devices.csv")
    }


@dataclass(frozen=True, slots=True)
class DeviceEmbodied:
    """One device's embodied emissions and lifetime, and where the figure comes from."""

    embodied_kg_co2e: float
    lifetime_s: float
    source: str

    @property
    def rate_g_per_s(self) -> float:
        return self.embodied_kg_co2e * 1000.0 / self.lifetime_s


def device_embodied(
    embodied_kg_co2e: float | None, lifetime_years: float | None, model: str | None
) -> DeviceEmbodied | None:
    """A device's figures from its config: its own ``embodied_kg_co2e``, else its ``model``'s
    in the shipped table; ``None`` when neither is set. Raises ``ValueError`` for a model the
    table lacks or a missing lifetime."""
    if embodied_kg_co2e is None and model is None:
        return None
    if lifetime_years is None or not lifetime_years > 0:
        raise ValueError("lifetime_years (> 0) is required with embodied_kg_co2e or model")
    if embodied_kg_co2e is not None:
        kg, source = embodied_kg_co2e, "config"
    else:
        entry = device_table().get(str(model).upper())
        if entry is None:
            known = ", ".join(sorted(device_table()))
            raise ValueError(f"model {model!r} is not in the shipped table (known: {known})")
        kg, source = entry.embodied_kg_co2e, f"table:{entry.source} ({entry.scope})"
    return DeviceEmbodied(kg, lifetime_years * SECONDS_PER_YEAR, source)


@dataclass(frozen=True, slots=True)
class EmbodiedSplit:
    """How one interval's embodied grams on one device were divided."""

    attributed_g: dict[str, float]
    unattributed_g: float = 0.0


def split_embodied(
    rate_g_per_s: float, t0: float, t1: float, spans: Mapping[str, tuple[float, float]]
) -> EmbodiedSplit:
    """Split ``rate_g_per_s * (t1 - t0)`` over the requests in flight, ``spans`` (request id ->
    (from, to), clipped to the interval here). The device-seconds some request was in flight
    (the union of the spans) are charged, each request by its share of the overlaps; the rest
    is unattributed."""
    duration_s = t1 - t0 if t1 > t0 else 0.0
    total_g = max(0.0, rate_g_per_s) * duration_s
    clipped: dict[str, tuple[float, float]] = {}
    for rid, (lo, hi) in spans.items():
        lo, hi = max(lo, t0), min(hi, t1)
        if hi > lo:
            clipped[rid] = (lo, hi)
    if not clipped or total_g <= 0.0:
        return EmbodiedSplit({}, total_g)
    used_s = 0.0
    reach = t0
    for lo, hi in sorted(clipped.values()):
        if hi > reach:
            used_s += hi - max(lo, reach)
            reach = hi
    used_g = total_g * min(1.0, used_s / duration_s)
    overlap_s = sum(hi - lo for lo, hi in clipped.values())
    shares = {rid: used_g * (hi - lo) / overlap_s for rid, (lo, hi) in clipped.items()}
    return EmbodiedSplit(shares, max(0.0, total_g - sum(shares.values())))


def water_l_per_j(
    wue_l_per_kwh: float | None, grid_l_per_kwh: float | None, pue: float
) -> float | None:
    """Litres per joule drawn by the IT load: on-site WUE plus PUE times the grid's water
    intensity (both L/kWh); ``None`` unless both are configured."""
    if wue_l_per_kwh is None or grid_l_per_kwh is None:
        return None
    return (wue_l_per_kwh + pue * grid_l_per_kwh) / J_PER_KWH
