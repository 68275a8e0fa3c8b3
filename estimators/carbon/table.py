"""The built-in yearly table of grid carbon intensity by zone, read from ``zones.csv``."""

from __future__ import annotations

import functools

from estimators.carbon.base import Intensity, IntensityProvider
from estimators.errors import CarbonError
from estimators.shipped import shipped_rows

#: CodeCarbon's world average, used when a zone is unknown.
WORLD_G_PER_KWH = 475.0


@functools.cache
def _table() -> dict[str, tuple[float, str]]:
    rows: dict[str, tuple[float, str]] = {}
    for row in shipped_rows("estimators.carbon", "zones.csv"):
        rows[row["zone"].upper()] = (float(row["g_per_kwh"]), f"{row['source']} {row['year']}")
    return rows


def zones() -> list[str]:
    return sorted(_table())


def has_zone(zone: str) -> bool:
    return zone.upper() in _table()


def table_intensity(zone: str) -> Intensity:
    """The table's figure for ``zone``. Raises ``CarbonError`` for a zone it does not hold."""
    entry = _table().get(zone.upper())
    if entry is None:
        raise CarbonError(f"zone {zone!r} is not in the built-in table (known: WORLD, US, FR, ...)")
    g_per_kwh, source = entry
    return Intensity(g_per_kwh=g_per_kwh, zone=zone.upper(), source=f"table:{source}")


class StaticIntensity(IntensityProvider):
    """A fixed figure (``carbon.intensity_g_per_kwh``) or the table's yearly mean."""

    name = "static"

    def __init__(self, fixed_g_per_kwh: float | None = None) -> None:
        self._fixed = fixed_g_per_kwh

    async def current(self, zone: str) -> Intensity:
        if self._fixed is not None:
            return Intensity(g_per_kwh=self._fixed, zone=zone.upper(), source="config")
        return table_intensity(zone)
