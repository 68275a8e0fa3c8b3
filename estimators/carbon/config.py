"""The ``carbon:`` section of config.yaml: the grid zone, PUE and the intensity provider."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from estimators.carbon.clock import DEFAULT_REFRESH_S, DEFAULT_TIMEOUT_S
from estimators.section import Section


class CarbonConfig(Section):
    zone: str = "WORLD"
    intensity_g_per_kwh: float | None = Field(None, ge=0)
    pue: float = Field(1.0, ge=1.0, le=5.0)
    #: on-site water usage effectiveness, litres per kWh of IT energy (cooling)
    wue_l_per_kwh: float | None = Field(None, ge=0)
    #: the grid's water intensity, litres per kWh generated (water is reported with both set)
    grid_water_l_per_kwh: float | None = Field(None, ge=0)
    provider: Literal["static", "electricitymaps", "uk-carbon-intensity", "watttime"] = "static"
    #: env var holding the provider's token (Electricity Maps auth-token; WattTime "user:pass")
    token_env: str | None = None
    url: str | None = None
    refresh_s: float = Field(DEFAULT_REFRESH_S, gt=0)
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)
