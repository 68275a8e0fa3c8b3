"""The ``carbon:`` section of config.yaml: the grid zone, PUE and the intensity provider."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from estimators.carbon.clock import DEFAULT_REFRESH_S, DEFAULT_TIMEOUT_S
from estimators.carbon.grid_water import TABLE_FILE, grid_water, grid_water_table
from estimators.section import Section


class CarbonConfig(Section):
    zone: str = "WORLD"
    intensity_g_per_kwh: float | None = Field(None, ge=0)
    pue: float = Field(1.0, ge=1.0, le=5.0)
    #: on-site water usage effectiveness, litres per kWh of IT energy (cooling)
    wue_l_per_kwh: float | None = Field(None, ge=0)
    #: the grid's water intensity, litres per kWh generated (water is reported with both set)
    grid_water_l_per_kwh: float | None = Field(None, ge=0)
    #: true: an unset grid_water_l_per_kwh takes the zone's figure from the shipped table
    #: (estimators/carbon/grid_water.csv); a zone it lacks is refused by check-config and serve
    grid_water_from_table: bool = False
    provider: Literal["static", "electricitymaps", "uk-carbon-intensity", "watttime"] = "static"
    #: env var holding the provider's token (Electricity Maps auth-token; WattTime "user:pass")
    token_env: str | None = None
    url: str | None = None
    refresh_s: float = Field(DEFAULT_REFRESH_S, gt=0)
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)

    @model_validator(mode="after")
    def _grid_water_from_table(self) -> CarbonConfig:
        """Fill ``grid_water_l_per_kwh`` from the table when asked and not configured (a
        configured figure wins). A zone the table lacks leaves it unset; ``check-config`` and
        ``serve`` refuse that (``grid_water_problem``)."""
        if not self.grid_water_from_table or self.grid_water_l_per_kwh is not None:
            return self
        row = grid_water(self.zone)
        if row is None:
            return self
        return self.model_copy(update={"grid_water_l_per_kwh": row.l_per_kwh})


def grid_water_problem(c: CarbonConfig) -> str | None:
    """Why ``carbon.grid_water_from_table`` cannot be honoured: the zone (and its country) has
    no row in the table and no figure of its own is configured; ``None`` when it can."""
    if not c.grid_water_from_table or c.grid_water_l_per_kwh is not None:
        return None
    known = ", ".join(sorted(grid_water_table()))
    return (
        f"zone {c.zone!r} has no grid water figure in the shipped table ({TABLE_FILE}; known: "
        f"{known}, and their sub-zones); set carbon.grid_water_l_per_kwh, or a carbon.zone "
        "the table holds"
    )
