"""The grid's water intensity by zone (litres consumed per kWh generated), read from the shipped
``grid_water.csv``, and the formula its rows were derived with, so that a test can check them.

Pure: no clock, no I/O beyond reading the shipped table. Sources in the table's header and in
docs/estimates.md (7.)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from estimators.shipped import shipped_rows

#: Litres per US gallon.
L_PER_GAL = 3.785411784

#: Median operational water consumption per fuel, US gallons per MWh generated: Macknick et
#: al. 2012 (Environ. Res. Lett. 7 045802, NREL), cooling-tower technologies; hydropower is
#: reservoir evaporation. Oil and other renewables have none (left out of a zone's mean).
MACKNICK_GAL_PER_MWH: dict[str, float] = {
    "coal": 687.0,
    "gas": 205.0,
    "nuclear": 672.0,
    "hydro": 4491.0,
    "biofuel": 553.0,
    "solar": 1.0,
    "wind": 0.0,
}

TABLE_FILE = "estimators/carbon/grid_water.csv"


@dataclass(frozen=True, slots=True)
class GridWater:
    """One zone's row: litres per kWh generated, the mix year, the share of that year's
    generation the factors cover, and where it comes from."""

    zone: str
    l_per_kwh: float
    mix_year: int
    coverage: float
    source: str


@functools.cache
def grid_water_table() -> dict[str, GridWater]:
    """The shipped table by zone (upper-cased)."""
    return {
        row["zone"].upper(): GridWater(
            zone=row["zone"].upper(),
            l_per_kwh=float(row["l_per_kwh"]),
            mix_year=int(row["mix_year"]),
            coverage=float(row["coverage"]),
            source=row["source"],
        )
        for row in shipped_rows("estimators.carbon", "grid_water.csv")
    }


def grid_water(zone: str) -> GridWater | None:
    """The table's row for ``zone``, else for its country (the part before the first ``-``:
    ``US-CAL-CISO`` -> ``US``); ``None`` when it holds neither (never a made-up figure)."""
    table = grid_water_table()
    key = zone.strip().upper()
    return table.get(key) or table.get(key.split("-", 1)[0])


def mix_water_l_per_kwh(mix_twh: Mapping[str, float]) -> tuple[float, float]:
    """``(litres per kWh, coverage)`` of a generation mix (TWh by fuel): the factors' mean
    weighted by the generation they cover, and that generation's share of the whole mix.
    How every row of the table was derived."""
    covered = {k: v for k, v in mix_twh.items() if k in MACKNICK_GAL_PER_MWH and v > 0}
    covered_twh = sum(covered.values())
    total_twh = sum(v for v in mix_twh.values() if v > 0)
    if covered_twh <= 0:
        return 0.0, 0.0
    gal_per_mwh = sum(v * MACKNICK_GAL_PER_MWH[k] for k, v in covered.items()) / covered_twh
    return gal_per_mwh * L_PER_GAL / 1000.0, covered_twh / total_twh
