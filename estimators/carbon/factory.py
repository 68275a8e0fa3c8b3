"""``carbon:`` config -> the intensity provider it names."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from estimators.carbon import ukgrid, watttime
from estimators.carbon.base import IntensityProvider
from estimators.carbon.config import CarbonConfig
from estimators.carbon.electricitymaps import DEFAULT_TOKEN_ENV, ElectricityMapsProvider
from estimators.carbon.table import StaticIntensity, has_zone, zones
from estimators.carbon.ukgrid import ZONES as UK_ZONES
from estimators.carbon.ukgrid import UKCarbonIntensityProvider
from estimators.carbon.watttime import DEFAULT_PASSWORD_ENV, DEFAULT_USER_ENV, WattTimeProvider
from estimators.errors import CarbonError

log = logging.getLogger(__name__)

PROVIDERS = ("static", "electricitymaps", "uk-carbon-intensity", "watttime")
#: Live providers with zone codes of their own: the table zone each falls back to.
TABLE_ZONES: dict[str, Callable[[str], str]] = {
    "uk-carbon-intensity": ukgrid.table_zone,
    "watttime": watttime.table_zone,
}
ZONES_FILE = "estimators/carbon/zones.csv"


def zone_findings(
    provider: str, zone: str, fixed_g_per_kwh: float | None
) -> tuple[str | None, str | None]:
    """``(problem, warning)`` about ``carbon.zone``. The static provider needs a zone of the
    table (unless a fixed figure makes the zone a label). A live provider takes its own zone
    codes, so an unknown one is only a warning, and only when its fallback would be the world
    average: the table holds neither the zone nor its country, and no fixed figure is set."""
    if fixed_g_per_kwh is not None:
        return None, None
    if provider == "static":
        if has_zone(zone):
            return None, None
        return (
            f"{zone!r} is not in the built-in table ({ZONES_FILE}); known zones: "
            f"{', '.join(zones())}; or set carbon.intensity_g_per_kwh",
            None,
        )
    if provider == "uk-carbon-intensity" and zone.upper() not in UK_ZONES:
        return None, f"{zone!r}: uk-carbon-intensity covers GB only; the table answers for it"
    table_zone = TABLE_ZONES.get(provider, str)(zone)
    if has_zone(table_zone) or has_zone(table_zone.split("-", 1)[0]):
        return None, None
    return None, (
        f"{zone!r}: when {provider} cannot answer, the fallback is the world average "
        f"(the built-in table, {ZONES_FILE}, holds neither {table_zone!r} nor its country); "
        "set carbon.intensity_g_per_kwh for a better fallback"
    )


def watttime_credentials(
    token_env: str | None, environ: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """WattTime's user and password: ``user:password`` in the env var named by ``token_env``,
    else ``WATTTIME_USER`` and ``WATTTIME_PASSWORD``."""
    if token_env:
        raw = environ.get(token_env, "")
        user, sep, password = raw.partition(":")
        if not sep or not user or not password:
            log.warning("carbon.token_env %s must hold user:password for WattTime", token_env)
            return None, None
        return user, password
    return environ.get(DEFAULT_USER_ENV), environ.get(DEFAULT_PASSWORD_ENV)


def build_provider(
    cfg: CarbonConfig,
    environ: Mapping[str, str] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> IntensityProvider:
    """The provider ``cfg.provider`` names, with its URL, token, refresh and timeout.

    A live provider falls back to ``cfg.intensity_g_per_kwh`` when set, else to the table.
    Raises ``CarbonError`` for an unknown provider name.
    """
    env = os.environ if environ is None else environ
    common: dict[str, Any] = {
        "refresh_s": cfg.refresh_s,
        "timeout_s": cfg.timeout_s,
        "fixed_g_per_kwh": cfg.intensity_g_per_kwh,
        "session": session,
    }
    if cfg.provider == "static":
        return StaticIntensity(cfg.intensity_g_per_kwh)
    if cfg.provider == "electricitymaps":
        token_env = cfg.token_env or DEFAULT_TOKEN_ENV
        token = env.get(token_env)
        if not token:
            log.warning("Electricity Maps: env var %s is empty; the table will answer", token_env)
        return ElectricityMapsProvider(token, cfg.url, **common)
    if cfg.provider == "uk-carbon-intensity":
        if cfg.zone.upper() not in UK_ZONES:
            log.warning("uk-carbon-intensity covers zone GB only; zone %s gets the table", cfg.zone)
        return UKCarbonIntensityProvider(cfg.url, **common)
    if cfg.provider == "watttime":
        user, password = watttime_credentials(cfg.token_env, env)
        if not user:
            log.warning("WattTime: no credentials in the environment; the table will answer")
        return WattTimeProvider(user, password, cfg.url, **common)
    raise CarbonError(f"unknown carbon provider {cfg.provider!r} (known: {', '.join(PROVIDERS)})")
