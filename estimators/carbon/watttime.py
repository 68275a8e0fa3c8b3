"""WattTime API v3: the marginal operating emissions rate (MOER) of a grid region.

A marginal signal, not an average: the emissions of the plants that answer a change in load,
which is what an extra request causes. Flow:

1. ``GET {base}/login`` with HTTP basic auth -> ``{"token": "..."}`` (valid 30 minutes);
2. ``GET {base}/v3/forecast?region=R&signal_type=co2_moer&horizon_hours=0`` with
   ``Authorization: Bearer <token>`` -> ``{"data": [{"point_time", "value"}, ...],
   "meta": {"region", "signal_type", "units": "lbs_co2_per_mwh", "generated_at", ...}}``; the
   first point is the current five minutes.

``co2_moer`` is in pounds of CO2 per MWh: 1 lb/MWh = 453.592 g / 1,000 kWh = 0.453592 g/kWh.
``/v3/signal-index`` answers a percentile (0-100) of the last month, not an emission rate, so it
cannot be converted and is not used. ``/v3/forecast`` needs a subscription except for the
``CAISO_NORTH`` preview region; without one the API answers 403 and the table stands in.
"""

from __future__ import annotations

import base64
from typing import Any

from estimators.carbon.base import Intensity
from estimators.carbon.clock import LiveProvider, ProviderHTTPError, g_per_kwh_value, parse_utc
from estimators.errors import CarbonError

G_PER_KWH_PER_LB_PER_MWH = 0.453592
#: g/kWh per unit of each ``meta.units`` the API may state.
UNIT_FACTORS: dict[str, float] = {
    "lbs_co2_per_mwh": G_PER_KWH_PER_LB_PER_MWH,
    "lb_co2_per_mwh": G_PER_KWH_PER_LB_PER_MWH,
    "lbs_co2e_per_mwh": G_PER_KWH_PER_LB_PER_MWH,
    "kg_co2_per_mwh": 1.0,
    "g_co2_per_kwh": 1.0,
}
#: Seconds a login token is reused (WattTime issues them for 30 minutes).
TOKEN_TTL_S = 25 * 60.0
#: Env vars read when ``carbon.token_env`` is not set (the names WattTime's own client uses).
DEFAULT_USER_ENV = "WATTTIME_USER"
DEFAULT_PASSWORD_ENV = "WATTTIME_PASSWORD"
#: Table zones for WattTime's US regions, by region-name prefix (the rest use their country).
REGION_ZONES: dict[str, str] = {
    "CAISO": "US-CAL-CISO",
    "ERCOT": "US-TEX-ERCO",
    "NYISO": "US-NY-NYIS",
    "ISONE": "US-NE-ISNE",
    "PJM": "US-MIDA-PJM",
    "MISO": "US-MIDW-MISO",
    "SPP": "US-CENT-SWPP",
    "BPA": "US-NW-BPAT",
}


def table_zone(region: str) -> str:
    """The table zone a WattTime region falls back to (its balancing authority, else itself)."""
    return REGION_ZONES.get(region.upper().split("_", 1)[0], region)


def basic_auth(username: str, password: str) -> str:
    """An ``Authorization`` header value for HTTP basic auth (RFC 7617, UTF-8)."""
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


class WattTimeProvider(LiveProvider):
    """WattTime's current marginal emissions rate for a region, in g/kWh.

    Args:
        username, password: the WattTime account (HTTP basic auth on ``/login``).
        signal_type: ``co2_moer`` (default).
        base_url, refresh_s, timeout_s, fixed_g_per_kwh, session, clock: see ``LiveProvider``.
    """

    name = "watttime"
    default_url = "https://api.watttime.org"

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        base_url: str | None = None,
        *,
        signal_type: str = "co2_moer",
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, **kwargs)
        self._username = username
        self._password = password
        self.signal_type = signal_type
        self._token: str | None = None
        self._token_at = 0.0

    def fallback_zone(self, zone: str) -> str:
        return table_zone(zone)

    async def _login(self) -> str:
        if not self._username or not self._password:
            raise CarbonError("no WattTime credentials (set the env var named by token_env)")
        data = await self.get_json(
            "/login", headers={"Authorization": basic_auth(self._username, self._password)}
        )
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise CarbonError("login answered no token")
        self._token = token
        self._token_at = self._clock()
        return token

    async def _bearer(self, renew: bool = False) -> str:
        if renew or self._token is None or self._clock() - self._token_at >= TOKEN_TTL_S:
            return await self._login()
        return self._token

    async def _forecast(self, zone: str, token: str) -> Any:
        return await self.get_json(
            "/v3/forecast",
            params={"region": zone, "signal_type": self.signal_type, "horizon_hours": "0"},
            headers={"Authorization": f"Bearer {token}"},
        )

    async def fetch(self, zone: str) -> Intensity:
        try:
            data = await self._forecast(zone, await self._bearer())
        except ProviderHTTPError as e:
            if e.status != 401:
                raise
            data = await self._forecast(zone, await self._bearer(renew=True))
        try:
            point = data["data"][0]
            meta = data.get("meta") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise CarbonError(f"unexpected answer: no data[0] ({e!r})") from e
        if not isinstance(point, dict) or not isinstance(meta, dict):
            raise CarbonError("unexpected answer: data[0] or meta is not an object")
        units = str(meta.get("units") or "lbs_co2_per_mwh").lower()
        factor = UNIT_FACTORS.get(units)
        if factor is None:
            raise CarbonError(f"units {units!r} cannot be converted to g/kWh")
        value = g_per_kwh_value(point.get("value"), "data[0].value") * factor
        source = f"{self.name} {self.signal_type} (marginal)"
        return Intensity(value, zone.upper(), source, parse_utc(point.get("point_time")))
