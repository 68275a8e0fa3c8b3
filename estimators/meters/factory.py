"""Builds the meter named by ``meter.kind``; ``auto`` picks the best one this machine has."""

from __future__ import annotations

import logging

from estimators.meters.base import Meter
from estimators.meters.null import NullMeter
from estimators.meters.simulated import LoadFn, SimulatedMeter
from proxy.config import MeterConfig

log = logging.getLogger("wattproxy.meter")


def build_meter(cfg: MeterConfig, load: LoadFn | None = None) -> Meter:
    """The meter for ``cfg``. ``load`` feeds the simulated meter's power model."""
    if cfg.kind == "none":
        return NullMeter()
    if cfg.kind == "simulated":
        devices = list(cfg.devices) if cfg.devices else ["gpu0"]
        return SimulatedMeter(load or (lambda: {}), devices=devices, idle_w=cfg.simulated_idle_w)
    log.warning(
        "meter kind %r is not available in this build; figures will be estimated", cfg.kind
    )
    return NullMeter()
