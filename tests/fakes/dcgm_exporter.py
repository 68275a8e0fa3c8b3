"""A stand-in for NVIDIA dcgm-exporter: its ``/metrics`` page as it prints it (metric names, HELP
and TYPE lines, labels, units: energy in mJ since boot, power in W) for scripted GPUs; tests
change the values between scrapes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web


@dataclass
class ExporterGpu:
    index: int
    uuid: str
    pci_bus_id: str
    energy_mj: int = 319_159_391
    power_w: float = 67.692


@dataclass
class FakeExporter:
    """What dcgm-exporter would print for ``gpus``; tests change the values between scrapes."""

    gpus: list[ExporterGpu]
    with_energy: bool = True
    status: int = 200
    scrapes: int = 0

    def labels(self, gpu: ExporterGpu) -> str:
        return (
            f'gpu="{gpu.index}",UUID="{gpu.uuid}",pci_bus_id="{gpu.pci_bus_id}",'
            f'device="nvidia{gpu.index}",modelName="NVIDIA H100 80GB HBM3",'
            'Hostname="gpu-node-1",DCGM_FI_DRIVER_VERSION="570.124.06"'
        )

    def page(self) -> str:
        metrics: list[tuple[str, str, str, Callable[[ExporterGpu], str]]] = [
            ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", lambda g: "1980"),
            ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda g: "33"),
            (
                "DCGM_FI_DEV_POWER_USAGE",
                "gauge",
                "Power draw (in W).",
                lambda g: f"{g.power_w:.6f}",
            ),
        ]
        if self.with_energy:
            metrics.append(
                (
                    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                    "counter",
                    "Total energy consumption since boot (in mJ).",
                    lambda g: str(g.energy_mj),
                )
            )
        metrics.append(("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda g: "0"))
        lines: list[str] = []
        for name, kind, help_text, value in metrics:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{{{self.labels(g)}}} {value(g)}" for g in self.gpus]
        return "\n".join(lines) + "\n"

    async def handle(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        if self.status != 200:
            return web.Response(status=self.status, text="busy")
        return web.Response(text=self.page(), content_type="text/plain")


def h100s() -> FakeExporter:
    return FakeExporter(
        [
            ExporterGpu(0, "GPU-15704b32-f531-14ce-0530-1ac21e4b68e6", "00000000:53:00.0"),
            ExporterGpu(1, "GPU-edc718f8-e593-6468-b9f9-563d508366ed", "00000000:64:00.0"),
        ]
    )
