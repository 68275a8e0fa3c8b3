"""Grid carbon intensity: a built-in yearly table and live providers behind one interface."""

from estimators.carbon.base import Intensity, IntensityProvider
from estimators.carbon.table import StaticIntensity, table_intensity

__all__ = ["Intensity", "IntensityProvider", "StaticIntensity", "table_intensity"]
