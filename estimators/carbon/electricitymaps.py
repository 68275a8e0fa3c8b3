"""Electricity Maps: live average carbon intensity of electricity consumed in a zone.

``GET {base}/v3/carbon-intensity/latest?zone=Z`` with header ``auth-token``, answered with
``{"zone", "carbonIntensity", "datetime", "updatedAt", "emissionFactorType", "isEstimated",
"estimationMethod"}``; ``carbonIntensity`` is gCO2eq/kWh (lifecycle factors by default), and
``datetime`` the UTC hour it is for. Zones are Electricity Maps codes (``DE``, ``FR``,
``US-CAL-CISO``, ``US-TEX-ERCO``, ...).
"""

from __future__ import annotations

from typing import Any

from estimators.carbon.base import Intensity
from estimators.carbon.clock import LiveProvider, g_per_kwh_value, parse_utc
from estimators.errors import CarbonError

#: Env var read for the token when ``carbon.token_env`` is not set.
DEFAULT_TOKEN_ENV = "ELECTRICITYMAPS_TOKEN"


class ElectricityMapsProvider(LiveProvider):
    """Electricity Maps' latest figure per zone, cached for ``refresh_s``.

    Args:
        token: the API token (sent as ``auth-token``); without one the API answers 401 and the
            table stands in.
        base_url, refresh_s, timeout_s, fixed_g_per_kwh, session, clock: see ``LiveProvider``.
    """

    name = "electricitymaps"
    default_url = "https://api.electricitymaps.com"

    def __init__(self, token: str | None = None, base_url: str | None = None, **kwargs: Any):
        super().__init__(base_url, **kwargs)
        self._token = token

    async def fetch(self, zone: str) -> Intensity:
        headers = {"auth-token": self._token} if self._token else {}
        data = await self.get_json(
            "/v3/carbon-intensity/latest", params={"zone": zone}, headers=headers
        )
        if not isinstance(data, dict):
            raise CarbonError(f"unexpected answer: {type(data).__name__}")
        value = g_per_kwh_value(data.get("carbonIntensity"), "carbonIntensity")
        source = self.name
        if data.get("isEstimated"):
            source += " (estimated)"
        return Intensity(value, zone.upper(), source, parse_utc(data.get("datetime")))
