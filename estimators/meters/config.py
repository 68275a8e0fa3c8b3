"""The ``meter:`` section of config.yaml: which backend, how often, and which devices."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from estimators.embodied import DeviceEmbodied, device_embodied
from estimators.meters.dcgm import DEFAULT_URL as DCGM_URL
from estimators.meters.rapl import DEFAULT_ROOT as RAPL_ROOT
from estimators.meters.simulated import DEFAULT_IDLE_W
from estimators.section import Section


class DeviceSelector(Section):
    index: int | None = Field(None, ge=0)
    uuid: str | None = None
    path: str | None = None
    #: embodied (manufacturing) kg CO2e of the device, spread over ``lifetime_years``
    embodied_kg_co2e: float | None = Field(None, ge=0)
    #: or the device's model, looked up in the shipped table (estimators/devices.csv)
    model: str | None = None
    lifetime_years: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> DeviceSelector:
        if sum(x is not None for x in (self.index, self.uuid, self.path)) != 1:
            raise ValueError("set exactly one of index, uuid or path")
        self.embodied()  # a model the table lacks, or a missing lifetime, fails at load
        return self

    def embodied(self) -> DeviceEmbodied | None:
        return device_embodied(self.embodied_kg_co2e, self.lifetime_years, self.model)


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

    def embodied(self) -> dict[str, DeviceEmbodied]:
        """The devices with embodied figures, by name."""
        out = {}
        for name, sel in (self.devices or {}).items():
            figures = sel.embodied()
            if figures is not None:
                out[name] = figures
        return out
