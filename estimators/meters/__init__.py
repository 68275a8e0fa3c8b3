"""Meters, the I/O shell that reads energy: one interface (``Meter.read``: cumulative joules per
device), a module per backend, ``build_meter`` for the ``meter:`` section (``auto`` picks what
the machine has) and the ``Sampler`` that reads the meter every interval off the event loop."""

from estimators.meters.base import EnergyCounter, Meter, PowerIntegrator, Reading
from estimators.meters.config import DeviceSelector, MeterConfig
from estimators.meters.dcgm import DcgmMeter
from estimators.meters.factory import build_meter
from estimators.meters.null import NullMeter
from estimators.meters.nvml import NvmlMeter
from estimators.meters.rapl import RaplMeter
from estimators.meters.sampler import Sampler
from estimators.meters.simulated import LoadFn, LoadTracker, SimulatedMeter

__all__ = [
    "DcgmMeter",
    "DeviceSelector",
    "EnergyCounter",
    "LoadFn",
    "LoadTracker",
    "Meter",
    "MeterConfig",
    "NullMeter",
    "NvmlMeter",
    "PowerIntegrator",
    "RaplMeter",
    "Reading",
    "Sampler",
    "SimulatedMeter",
    "build_meter",
]
