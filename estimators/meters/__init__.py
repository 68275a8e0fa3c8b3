"""Meters: one interface (``Meter.read``: cumulative joules per device), a module per backend."""

from estimators.meters.base import EnergyCounter, Meter, PowerIntegrator, Reading
from estimators.meters.dcgm import DcgmMeter
from estimators.meters.null import NullMeter
from estimators.meters.nvml import NvmlMeter
from estimators.meters.rapl import RaplMeter
from estimators.meters.simulated import SimulatedMeter

__all__ = [
    "DcgmMeter",
    "EnergyCounter",
    "Meter",
    "NullMeter",
    "NvmlMeter",
    "PowerIntegrator",
    "RaplMeter",
    "Reading",
    "SimulatedMeter",
]
