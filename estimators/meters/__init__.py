"""Meters: one interface (``Meter.read`` -> cumulative joules per device), one module per backend."""

from estimators.meters.base import EnergyCounter, Meter, PowerIntegrator, Reading
from estimators.meters.null import NullMeter
from estimators.meters.simulated import SimulatedMeter

__all__ = ["EnergyCounter", "Meter", "NullMeter", "PowerIntegrator", "Reading", "SimulatedMeter"]
