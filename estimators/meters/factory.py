"""Builds the meter named by ``meter.kind``; ``auto`` picks the best one this machine has.

An explicit kind that cannot open raises ``MeterError`` (the operator asked for it, so the caller
decides whether to stop). ``auto`` tries NVML, then RAPL, and settles for the null meter, which
marks every figure as estimated.
"""

from __future__ import annotations

import logging
from types import ModuleType

from estimators.errors import MeterError
from estimators.meters.base import GpuSelector, Meter
from estimators.meters.config import MeterConfig
from estimators.meters.dcgm import DcgmMeter
from estimators.meters.null import NullMeter
from estimators.meters.nvml import NvmlMeter
from estimators.meters.rapl import RaplMeter
from estimators.meters.simulated import LoadFn, SimulatedMeter

log = logging.getLogger("wattproxy.meter")


def build_meter(
    cfg: MeterConfig, load: LoadFn | None = None, *, nvml: ModuleType | None = None
) -> Meter:
    """The meter for ``cfg``.

    Args:
        load: feeds the simulated meter's power model.
        nvml: the ``pynvml`` module to use (tests pass a fake); default nvidia-ml-py.

    Raises:
        MeterError: an explicitly named backend cannot be opened.
    """
    if cfg.kind == "none":
        return NullMeter()
    if cfg.kind == "simulated":
        devices = list(cfg.devices) if cfg.devices else ["gpu0"]
        return SimulatedMeter(
            load or (lambda: {}),
            devices=devices,
            idle_w=cfg.simulated_idle_w,
            noise=cfg.simulated_noise,
        )
    if cfg.kind == "nvml":
        return NvmlMeter(_gpu_selectors(cfg), nvml=nvml)
    if cfg.kind == "dcgm":
        return DcgmMeter(cfg.dcgm_url, _gpu_selectors(cfg), interval_s=cfg.interval_ms / 1000.0)
    if cfg.kind == "rapl":
        return RaplMeter(cfg.rapl_root, _rapl_paths(cfg))
    return _auto(cfg, nvml)


def _auto(cfg: MeterConfig, nvml: ModuleType | None) -> Meter:
    """NVML if a GPU answers, else RAPL if readable, else the null meter."""
    selectors = (cfg.devices or {}).values()
    wants_gpu = all(s.path is None for s in selectors)
    wants_cpu = all(s.path is not None for s in selectors)
    if wants_gpu and NvmlMeter.is_available(nvml):
        try:
            return NvmlMeter(_gpu_selectors(cfg), nvml=nvml)
        except MeterError as e:
            log.warning("meter auto: NVML answers but cannot be used: %s", e)
    if wants_cpu and RaplMeter.is_available(cfg.rapl_root):
        try:
            meter = RaplMeter(cfg.rapl_root, _rapl_paths(cfg))
        except MeterError as e:
            log.warning("meter auto: RAPL is present but cannot be used: %s", e)
        else:
            log.info("meter auto: no NVIDIA GPU answers; metering CPU packages through RAPL")
            return meter
    log.warning(
        "meter auto: no GPU answers through NVML and no RAPL counter under %s is readable; "
        "figures will be estimated (set meter.kind to dcgm for a dcgm-exporter)",
        cfg.rapl_root,
    )
    return NullMeter()


def _gpu_selectors(cfg: MeterConfig) -> dict[str, GpuSelector] | None:
    """``meter.devices`` as NVML index or UUID per name; ``None``: every GPU."""
    if not cfg.devices:
        return None
    selectors: dict[str, GpuSelector] = {}
    for name, selector in cfg.devices.items():
        if selector.index is not None:
            selectors[name] = selector.index
        elif selector.uuid is not None:
            selectors[name] = selector.uuid
        else:
            raise MeterError(
                f"meter.devices.{name}: a path selects a RAPL domain; "
                f"the {cfg.kind} meter needs index or uuid"
            )
    return selectors


def _rapl_paths(cfg: MeterConfig) -> dict[str, str] | None:
    """``meter.devices`` as powercap folders per name; ``None``: every package."""
    if not cfg.devices:
        return None
    paths: dict[str, str] = {}
    for name, selector in cfg.devices.items():
        if selector.path is None:
            raise MeterError(
                f"meter.devices.{name}: index and uuid select GPUs; "
                "the rapl meter needs path (e.g. /sys/class/powercap/intel-rapl:0)"
            )
        paths[name] = selector.path
    return paths
