"""The carbon-intensity provider interface.

A provider answers ``current(zone)`` with grams CO2e per kWh. Live providers cache, time out and
fall back to the table; the sampler asks only ``CarbonClock.g_per_j()`` on each sample, which
never waits on the network.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Intensity:
    """Grid carbon intensity at a time.

    Args:
        g_per_kwh: grams CO2e per kWh drawn from the grid.
        zone: the zone code it is for.
        source: where it came from (``table:<source>``, ``electricitymaps``, ...).
        at: UTC time the figure is for.
        fallback: true when a live provider failed and the table answered instead.
    """

    g_per_kwh: float
    zone: str
    source: str
    at: datetime | None = None
    fallback: bool = False


class IntensityProvider(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    async def current(self, zone: str) -> Intensity:
        """The intensity now. Raises ``CarbonError`` on failure."""

    async def forecast(self, zone: str, now: datetime) -> list[Intensity] | None:
        """Forecast figures from ``now`` on, each ``at`` the start of its window, or None when
        the provider gives no forecast. Raises ``CarbonError`` on failure."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release HTTP sessions."""
