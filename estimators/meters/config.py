"""The ``meter:`` section of config.yaml: which backend, how often, and which devices."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from estimators.meters.dcgm import DEFAULT_URL as DCGM_URL
from estimators.meters.rapl import DEFAULT_ROOT as RAPL_ROOT
from estimators.meters.simulated import DEFAULT_IDLE_W
from estimators.section import Section


class DeviceSelector(Section):
    index: int | None = Field(None, ge=0)
    uuid: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one(self) -> DeviceSelector:
        if sum(x is not None for x in (self.index, self.uuid, self.path)) != 1:
            raise ValueError("set exactly one of index, uuid or path")
        return self


class MeterConfig(Section):
    kind: Literal["auto", "nvml", "dcgm", "rapl", "simulated", "none"] = "auto"
    interval_ms: int = Field(100, ge=10, le=60_000)
    devices: dict[str, DeviceSelector] | None = None
    dcgm_url: str = DCGM_URL
    rapl_root: str = RAPL_ROOT
    #: simulated meter only: idle watts of the simulated device
    simulated_idle_w: float = Field(DEFAULT_IDLE_W, ge=0)
    #: simulated meter only: relative standard deviation of its seeded power noise
    simulated_noise: float = Field(0.02, ge=0, le=0.5)
