"""The GB national grid's Carbon Intensity API (NESO, formerly National Grid ESO): free, no key.

``GET {base}/intensity`` answers the current half hour:
``{"data": [{"from": "2018-01-20T12:00Z", "to": "2018-01-20T12:30Z",
"intensity": {"forecast": 266, "actual": 263, "index": "moderate"}}]}`` in gCO2/kWh
(operational emissions of generation). ``actual`` is null until metered; the forecast stands in.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from estimators.carbon.base import Intensity
from estimators.carbon.clock import LiveProvider, g_per_kwh_value, parse_utc
from estimators.errors import CarbonError

#: Zone codes this provider answers for; any other zone gets the table.
ZONES = frozenset(("GB", "UK"))
_JSON = {"Accept": "application/json"}


def table_zone(zone: str) -> str:
    """The table zone this provider falls back to: GB for its own zones."""
    return "GB" if zone.upper() in ZONES else zone


class UKCarbonIntensityProvider(LiveProvider):
    """Great Britain's national carbon intensity for the current half hour."""

    name = "uk-carbon-intensity"
    default_url = "https://api.carbonintensity.org.uk"

    def __init__(self, base_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)

    def fallback_zone(self, zone: str) -> str:
        return table_zone(zone)

    async def fetch(self, zone: str) -> Intensity:
        if zone.upper() not in ZONES:
            raise CarbonError(f"covers Great Britain only (zone GB), not {zone!r}")
        data = await self.get_json("/intensity", headers=_JSON)
        try:
            period = data["data"][0]
            figures = period["intensity"]
        except (KeyError, IndexError, TypeError) as e:
            raise CarbonError(f"unexpected answer: no data[0].intensity ({e!r})") from e
        if not isinstance(figures, dict):
            raise CarbonError("unexpected answer: intensity is not an object")
        kind = "actual" if figures.get("actual") is not None else "forecast"
        value = g_per_kwh_value(figures.get(kind), f"intensity.{kind}")
        at = parse_utc(period.get("from")) if isinstance(period, dict) else None
        return Intensity(value, zone.upper(), f"{self.name} {kind}", at)

    async def forecast(self, zone: str, now: datetime) -> list[Intensity] | None:
        """The half hours of the next 24 h (``/intensity/{from}/fw24h``), by their forecast."""
        if zone.upper() not in ZONES:
            return None
        start = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
        data = await self.get_json(f"/intensity/{start}/fw24h", headers=_JSON)
        periods = data.get("data") if isinstance(data, dict) else None
        if not isinstance(periods, list):
            raise CarbonError("unexpected forecast: no data list")
        out = []
        for period in periods:
            figures = period.get("intensity") if isinstance(period, dict) else None
            at = parse_utc(period.get("from")) if isinstance(period, dict) else None
            if not isinstance(figures, dict) or at is None:
                continue
            value = g_per_kwh_value(figures.get("forecast"), "intensity.forecast")
            out.append(Intensity(value, zone.upper(), f"{self.name} forecast", at))
        return out
