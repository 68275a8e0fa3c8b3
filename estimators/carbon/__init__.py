"""Grid carbon intensity, the I/O shell that asks the grid: a built-in yearly table and live
providers behind one interface, ``build_provider`` for the ``carbon:`` section, and the clock
that holds the current figure for the sampler. Also the grid's water intensity by zone (a
shipped yearly table, ``grid_water``)."""

from estimators.carbon.base import Intensity, IntensityProvider
from estimators.carbon.clock import CarbonClock, LiveProvider, fallback_intensity
from estimators.carbon.config import CarbonConfig, grid_water_problem
from estimators.carbon.deferral import deferral_s
from estimators.carbon.electricitymaps import ElectricityMapsProvider
from estimators.carbon.factory import build_provider, zone_findings
from estimators.carbon.grid_water import GridWater, grid_water, grid_water_table
from estimators.carbon.table import StaticIntensity, table_intensity
from estimators.carbon.ukgrid import UKCarbonIntensityProvider
from estimators.carbon.watttime import WattTimeProvider

__all__ = [
    "CarbonClock",
    "CarbonConfig",
    "ElectricityMapsProvider",
    "GridWater",
    "Intensity",
    "IntensityProvider",
    "LiveProvider",
    "StaticIntensity",
    "UKCarbonIntensityProvider",
    "WattTimeProvider",
    "build_provider",
    "deferral_s",
    "fallback_intensity",
    "grid_water",
    "grid_water_problem",
    "grid_water_table",
    "table_intensity",
    "zone_findings",
]
