"""Carbon intensity over time: what the live providers share (``LiveProvider``: one HTTP
session with a timeout, a per-zone cache for ``refresh_s``, the table when the provider fails)
and the ``CarbonClock`` the sampler reads on every sample without waiting on the network.

A live provider never raises from ``current``: a failed, timed-out, erroring or null answer
becomes the table's yearly figure with ``fallback=True`` (or the configured fixed figure). The
clock holds the latest intensity; ``g_per_j()`` is a plain read, ``refresh()`` asks the provider
and ``run()`` refreshes every ``refresh_s`` in the background. Each sample's joules are
converted at the intensity of the moment they were drawn, so a request that spans a change of
intensity is charged each part at its own rate.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import aiohttp

from estimators.carbon.base import Intensity, IntensityProvider
from estimators.carbon.table import table_intensity
from estimators.errors import CarbonError
from estimators.units import g_per_j

log = logging.getLogger(__name__)

#: Seconds a live figure is reused before the provider is asked again.
DEFAULT_REFRESH_S = 300.0
#: Seconds one provider request may take in all (connect, send, read).
DEFAULT_TIMEOUT_S = 5.0
#: Seconds a fallback figure is reused before the provider is tried again (capped by refresh_s).
RETRY_AFTER_FAILURE_S = 60.0
WORLD = "WORLD"


def fallback_intensity(
    zone: str, reason: str = "", fixed_g_per_kwh: float | None = None
) -> Intensity:
    """The figure used when a live provider fails: the configured fixed figure, else the
    table's for the zone, its country (the part before the first ``-``), or the world."""
    zone_u = zone.upper()
    if fixed_g_per_kwh is not None:
        source = "config" + (f" ({reason})" if reason else "")
        return Intensity(fixed_g_per_kwh, zone_u, source, fallback=True)
    for candidate in dict.fromkeys((zone_u, zone_u.split("-", 1)[0], WORLD)):
        try:
            found = table_intensity(candidate)
        except CarbonError:
            continue
        source = found.source if candidate == zone_u else f"{found.source} for {candidate}"
        if reason:
            source += f" ({reason})"
        return Intensity(found.g_per_kwh, zone_u, source, fallback=True)
    raise CarbonError("the built-in table has no WORLD row")  # pragma: no cover - data error


def parse_utc(value: Any) -> datetime | None:
    """An ISO 8601 timestamp from an API (``Z`` suffix, with or without seconds), or ``None``."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def g_per_kwh_value(value: Any, what: str) -> float:
    """A provider's number, checked: finite and >= 0. Raises ``CarbonError`` for null or junk."""
    if value is None:
        raise CarbonError(f"{what} is null")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CarbonError(f"{what} is not a number: {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0.0:
        raise CarbonError(f"{what} is out of range: {number}")
    return number


class ProviderHTTPError(CarbonError):
    """A provider answered with an HTTP error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LiveProvider(IntensityProvider):
    """The policy shared by the live providers; subclasses implement ``fetch`` only.

    Args:
        base_url: the API's base URL (``carbon.url`` overrides it, e.g. in tests).
        refresh_s: seconds a zone's figure is reused.
        timeout_s: seconds one HTTP request may take in all.
        fixed_g_per_kwh: used instead of the table when the provider fails.
        session: an aiohttp session to use (not closed here); by default one is made lazily.
        clock: monotonic seconds, for the cache.
    """

    name = "live"
    default_url = ""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fixed_g_per_kwh: float | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = (base_url or self.default_url).rstrip("/")
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.fixed_g_per_kwh = fixed_g_per_kwh
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._cache: dict[str, tuple[float, float, Intensity]] = {}  # zone -> (at, ttl, value)

    @abc.abstractmethod
    async def fetch(self, zone: str) -> Intensity:
        """Ask the API once. Raises ``CarbonError`` on any failure."""

    def fallback_zone(self, zone: str) -> str:
        """The table zone to fall back to for ``zone`` (providers with their own region
        codes map them here)."""
        return zone

    async def current(self, zone: str) -> Intensity:
        """The zone's intensity: cached, fetched, or the fallback with ``fallback=True``."""
        now = self._clock()
        cached = self._cache.get(zone)
        if cached is not None and now - cached[0] < cached[1]:
            return cached[2]
        try:
            intensity = await self.fetch(zone)
            ttl = self.refresh_s
        except CarbonError as e:
            log.warning("%s: %s; using the fallback intensity for %s", self.name, e, zone)
            fallback = fallback_intensity(self.fallback_zone(zone), str(e), self.fixed_g_per_kwh)
            intensity = Intensity(
                fallback.g_per_kwh, zone.upper(), fallback.source, fallback.at, fallback=True
            )
            ttl = min(self.refresh_s, RETRY_AFTER_FAILURE_S)
        self._cache[zone] = (now, ttl, intensity)
        return intensity

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
            self._owns_session = True
        return self._session

    async def get_json(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """GET ``base_url + path`` and decode JSON; every failure becomes ``CarbonError``.
        Raises ``ProviderHTTPError`` (a ``CarbonError``) for HTTP error statuses."""
        url = f"{self.base_url}{path}"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self._http().get(
                url, params=params, headers=headers, timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise ProviderHTTPError(resp.status, f"{path}: HTTP {resp.status}")
                return await resp.json(content_type=None)
        except TimeoutError as e:
            raise CarbonError(f"{path}: no answer within {self.timeout_s:g} s") from e
        except aiohttp.ClientError as e:
            raise CarbonError(f"{path}: {type(e).__name__}: {e}") from e
        except ValueError as e:  # JSON decoding
            raise CarbonError(f"{path}: not JSON: {e}") from e

    async def close(self) -> None:
        if self._session is not None and self._owns_session and not self._session.closed:
            await self._session.close()
        self._session = None


class CarbonClock:
    """The latest grid intensity for one zone, refreshed in the background.

    Args:
        provider: where intensities come from.
        zone: the zone code.
        pue: facility power usage effectiveness (>= 1): grid joules per accelerator joule.
        refresh_s: seconds between refreshes in ``run``.
        sleep: the coroutine ``run`` waits with (tests pass a fake).
        on_update: called with each new intensity (the proxy sets its gauges there).
    """

    def __init__(
        self,
        provider: IntensityProvider,
        zone: str,
        pue: float = 1.0,
        refresh_s: float = DEFAULT_REFRESH_S,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_update: Callable[[Intensity], None] | None = None,
    ) -> None:
        if pue < 1.0 or not math.isfinite(pue):
            raise ValueError(f"pue must be >= 1, got {pue}")
        self.provider = provider
        self.zone = zone
        self.pue = pue
        self.refresh_s = refresh_s
        self._sleep = sleep
        self._on_update = on_update
        table = self._table(zone)  # until the first refresh: the yearly table figure
        self._set(Intensity(table.g_per_kwh, table.zone, table.source, table.at, fallback=False))

    def _table(self, zone: str, reason: str = "") -> Intensity:
        table_zone = zone
        if isinstance(self.provider, LiveProvider):
            table_zone = self.provider.fallback_zone(zone)
        found = fallback_intensity(table_zone, reason)
        return Intensity(found.g_per_kwh, zone.upper(), found.source, found.at, fallback=True)

    def _set(self, intensity: Intensity) -> None:
        self._intensity = intensity
        self._g_per_j = g_per_j(intensity.g_per_kwh, self.pue)
        if self._on_update is not None:
            self._on_update(intensity)

    @property
    def intensity(self) -> Intensity:
        """The latest intensity (for the ``wattproxy_grid_carbon_intensity_grams_per_kwh``
        gauge and for records)."""
        return self._intensity

    def g_per_j(self) -> float:
        """Grams CO2e per accelerator joule now, PUE included. Never blocks."""
        return self._g_per_j

    async def refresh(self) -> Intensity:
        """Ask the provider once; on ``CarbonError`` use the table (``fallback=True``)."""
        try:
            intensity = await self.provider.current(self.zone)
        except CarbonError as e:
            log.warning("carbon intensity for %s: %s; using the table", self.zone, e)
            intensity = self._table(self.zone, str(e))
        self._set(intensity)
        return intensity

    async def forecast(self, now: datetime) -> list[Intensity] | None:
        """The provider's forecast for this zone from ``now`` on; None when it gives none or
        fails (logged): no forecast, no deferral."""
        try:
            return await self.provider.forecast(self.zone, now)
        except CarbonError as e:
            log.warning("carbon forecast for %s: %s; not deferring", self.zone, e)
            return None

    async def run(self) -> None:
        """Refresh now and every ``refresh_s`` until cancelled; errors are logged, not raised."""
        while True:
            try:
                await self.refresh()
            except Exception:  # keep the loop alive; the last figure stays in use
                log.exception("carbon intensity refresh failed for %s", self.zone)
            await self._sleep(self.refresh_s)
