"""build_meter: explicit kinds open their backend or raise; auto falls through NVML, RAPL, null."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from estimators.errors import MeterError, MeterUnavailable
from estimators.meters import (
    DcgmMeter,
    MeterConfig,
    NullMeter,
    NvmlMeter,
    RaplMeter,
    SimulatedMeter,
    build_meter,
)
from tests.fakes.fake_pynvml import FakeGpu, FakePynvml

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def meter_config(**values: Any) -> MeterConfig:
    return MeterConfig.model_validate(values)


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    root = tmp_path / "powercap"
    for index in (0, 1):
        zone = root / f"intel-rapl:{index}"
        zone.mkdir(parents=True)
        (zone / "name").write_text(f"package-{index}\n")
        (zone / "energy_uj").write_text("123456789\n")
        (zone / "max_energy_range_uj").write_text("262143328850\n")
    return root


def one_gpu(**overrides: Any) -> FakePynvml:
    return FakePynvml([FakeGpu("GPU-11112222-3333-4444-5555-666677778888", **overrides)])


def no_driver() -> FakePynvml:
    return FakePynvml(library_found=False)


def test_none_and_simulated() -> None:
    assert isinstance(build_meter(meter_config(kind="none")), NullMeter)
    simulated = build_meter(meter_config(kind="simulated", devices={"gpu3": {"index": 3}}))
    assert isinstance(simulated, SimulatedMeter)
    assert simulated.devices() == ["gpu3"]


def test_explicit_nvml_with_uuid_selector() -> None:
    nvml = one_gpu()
    cfg = meter_config(
        kind="nvml", devices={"a100": {"uuid": "GPU-11112222-3333-4444-5555-666677778888"}}
    )
    meter = build_meter(cfg, nvml=nvml)
    assert isinstance(meter, NvmlMeter)
    assert meter.devices() == ["a100"]
    nvml.gpus[0].draw_mj(2_500)
    assert meter.read().energy_j == {"a100": 2.5}


def test_explicit_nvml_without_driver_raises() -> None:
    with pytest.raises(MeterUnavailable, match="no NVIDIA driver"):
        build_meter(meter_config(kind="nvml"), nvml=no_driver())


def test_explicit_nvml_rejects_a_path_selector() -> None:
    cfg = meter_config(kind="nvml", devices={"gpu0": {"path": "/sys/class/powercap/x"}})
    with pytest.raises(MeterError, match=r"meter\.devices\.gpu0: a path selects a RAPL domain"):
        build_meter(cfg, nvml=one_gpu())


def test_explicit_rapl(powercap: Path) -> None:
    meter = build_meter(meter_config(kind="rapl", rapl_root=str(powercap)))
    assert isinstance(meter, RaplMeter)
    assert meter.devices() == ["cpu0", "cpu1"]

    chosen = build_meter(
        meter_config(
            kind="rapl",
            rapl_root=str(powercap),
            devices={"socket": {"path": str(powercap / "intel-rapl:1")}},
        )
    )
    assert chosen.devices() == ["socket"]


def test_explicit_rapl_without_powercap_raises(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="no intel-rapl domain"):
        build_meter(meter_config(kind="rapl", rapl_root=str(tmp_path)))
    with pytest.raises(MeterError, match="the rapl meter needs path"):
        build_meter(meter_config(kind="rapl", devices={"cpu0": {"index": 0}}))


async def test_explicit_dcgm(aiohttp_server: ServerFactory) -> None:
    page = (
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).\n"
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
        'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-a",pci_bus_id="00000000:53:00.0",'
        'device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node",'
        'DCGM_FI_DRIVER_VERSION="570.124.06"} 71.250000\n'
    )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    cfg = meter_config(kind="dcgm", dcgm_url=str(server.make_url("/metrics")))

    meter = await asyncio.to_thread(build_meter, cfg)

    assert isinstance(meter, DcgmMeter)
    assert meter.devices() == ["gpu0"]
    assert (await asyncio.to_thread(meter.read)).power_w == {"gpu0": 71.25}


def test_auto_prefers_a_gpu(powercap: Path) -> None:
    meter = build_meter(meter_config(kind="auto", rapl_root=str(powercap)), nvml=one_gpu())
    assert isinstance(meter, NvmlMeter)
    assert meter.devices() == ["gpu0"]


def test_auto_falls_back_to_rapl(powercap: Path) -> None:
    meter = build_meter(meter_config(kind="auto", rapl_root=str(powercap)), nvml=no_driver())
    assert isinstance(meter, RaplMeter)
    assert meter.devices() == ["cpu0", "cpu1"]


def test_auto_falls_through_a_gpu_that_cannot_be_used(
    powercap: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="wattproxy.meter"):
        meter = build_meter(
            meter_config(kind="auto", rapl_root=str(powercap)), nvml=one_gpu(mig_mode=[1, 1])
        )
    assert isinstance(meter, RaplMeter)
    assert "MIG enabled" in caplog.text


def test_auto_with_nothing_is_the_null_meter_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="wattproxy.meter"):
        meter = build_meter(meter_config(kind="auto", rapl_root=str(tmp_path)), nvml=no_driver())
    assert isinstance(meter, NullMeter)
    assert "figures will be estimated" in caplog.text


def test_auto_with_gpu_selectors_does_not_meter_cpus_instead(powercap: Path) -> None:
    cfg = meter_config(kind="auto", rapl_root=str(powercap), devices={"gpu0": {"index": 0}})
    assert isinstance(build_meter(cfg, nvml=no_driver()), NullMeter)
    assert isinstance(build_meter(cfg, nvml=one_gpu()), NvmlMeter)
