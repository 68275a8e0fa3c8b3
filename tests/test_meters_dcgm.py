"""DcgmMeter against a dcgm-exporter page served on real loopback HTTP, with scripted counters.

The page follows dcgm-exporter 3.x/4.x: ``# HELP``/``# TYPE`` per metric, the default counters'
help texts, and the labels gpu, UUID, pci_bus_id, device, modelName, Hostname and
DCGM_FI_DRIVER_VERSION on every series.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from estimators.errors import MeterError, MeterUnavailable
from estimators.meters import DcgmMeter
from estimators.meters.dcgm import Series, parse_page, select
from tests.fakes.dcgm_exporter import FakeExporter, h100s

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


class ManualClock:
    def __init__(self, t_s: float = 100.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


async def serve(exporter: FakeExporter, aiohttp_server: ServerFactory) -> str:
    app = web.Application()
    app.router.add_get("/metrics", exporter.handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/metrics"))


async def test_counter_path_selects_by_gpu_label(aiohttp_server: ServerFactory) -> None:
    exporter = h100s()
    url = await serve(exporter, aiohttp_server)
    clock = ManualClock()
    meter = await asyncio.to_thread(DcgmMeter, url, clock=clock)
    assert meter.devices() == ["gpu0", "gpu1"]

    exporter.gpus[0].energy_mj += 120_500
    exporter.gpus[1].energy_mj += 30_000
    exporter.gpus[0].power_w = 241.0
    clock.t_s += 0.5
    reading = await asyncio.to_thread(meter.read)

    assert reading.timestamp_s == 100.5
    assert reading.energy_j == {"gpu0": 120.5, "gpu1": 30.0}
    assert reading.power_w == {"gpu0": 241.0, "gpu1": 67.692}
    assert reading.errors == {}
    assert exporter.scrapes == 2


async def test_gpu_labels_that_are_not_ascii_digits_are_not_gpus(
    aiohttp_server: ServerFactory,
) -> None:
    """A superscript two passes ``isdigit()`` and ``int()`` raises on it; ``int()`` reads an
    Arabic-Indic one as 1, aliasing gpu1. Default devices come from ASCII-digit labels only."""
    exporter = h100s()
    page = exporter.page()
    odd = "".join(
        f'DCGM_FI_DEV_POWER_USAGE{{gpu="{label}",UUID="GPU-{n}"}} 50.0\n'
        for n, label in enumerate(["\u00b2", "\u0661", ""])
    )

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=page + odd, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    server = await aiohttp_server(app)
    meter = await asyncio.to_thread(DcgmMeter, str(server.make_url("/metrics")))
    assert meter.devices() == ["gpu0", "gpu1"]


async def test_uuid_label_selects_the_gpu(aiohttp_server: ServerFactory) -> None:
    exporter = h100s()
    url = await serve(exporter, aiohttp_server)
    meter = await asyncio.to_thread(
        DcgmMeter, url, {"llm": "GPU-edc718f8-e593-6468-b9f9-563d508366ed"}, clock=ManualClock()
    )
    exporter.gpus[0].energy_mj += 9_000
    exporter.gpus[1].energy_mj += 4_000

    reading = await asyncio.to_thread(meter.read)

    assert reading.energy_j == {"llm": 4.0}


async def test_power_is_integrated_when_the_exporter_has_no_energy_counter(
    aiohttp_server: ServerFactory,
) -> None:
    exporter = h100s()
    exporter.with_energy = False
    exporter.gpus[0].power_w = 100.0
    url = await serve(exporter, aiohttp_server)
    clock = ManualClock(0.0)
    meter = await asyncio.to_thread(DcgmMeter, url, {"gpu0": 0}, clock=clock)

    clock.t_s, exporter.gpus[0].power_w = 2.0, 300.0
    first = await asyncio.to_thread(meter.read)
    clock.t_s, exporter.gpus[0].power_w = 2.5, 500.0
    second = await asyncio.to_thread(meter.read)

    assert first.energy_j == {"gpu0": 400.0}  # (100 W + 300 W) / 2 * 2 s
    assert second.energy_j == {"gpu0": 600.0}  # + (300 W + 500 W) / 2 * 0.5 s
    assert second.power_w == {"gpu0": 500.0}


async def test_counter_reset_is_absorbed(aiohttp_server: ServerFactory) -> None:
    exporter = h100s()
    url = await serve(exporter, aiohttp_server)
    meter = await asyncio.to_thread(DcgmMeter, url, {"gpu1": 1}, clock=ManualClock())
    exporter.gpus[1].energy_mj += 5_000
    assert (await asyncio.to_thread(meter.read)).energy_j == {"gpu1": 5.0}

    exporter.gpus[1].energy_mj = 1_500  # the node rebooted: "since boot" starts again
    assert (await asyncio.to_thread(meter.read)).energy_j == {"gpu1": 6.5}


async def test_missing_gpu_is_an_error_for_that_device_only(aiohttp_server: ServerFactory) -> None:
    exporter = h100s()
    url = await serve(exporter, aiohttp_server)
    meter = await asyncio.to_thread(DcgmMeter, url, {"gpu0": 0, "gpu5": 5}, clock=ManualClock())
    exporter.gpus[0].energy_mj += 1_000

    reading = await asyncio.to_thread(meter.read)

    assert reading.energy_j == {"gpu0": 1.0}
    assert reading.errors == {"gpu5": f'dcgm: no series for gpu="5" on {url}'}


async def test_exporter_outage_raises_and_the_meter_recovers(
    aiohttp_server: ServerFactory,
) -> None:
    exporter = h100s()
    url = await serve(exporter, aiohttp_server)
    meter = await asyncio.to_thread(DcgmMeter, url, clock=ManualClock())

    exporter.status = 503
    with pytest.raises(MeterError, match=r"cannot scrape.*503"):
        await asyncio.to_thread(meter.read)

    exporter.status = 200
    exporter.gpus[0].energy_mj += 7_000
    reading = await asyncio.to_thread(meter.read)
    assert reading.energy_j == {"gpu0": 7.0, "gpu1": 0.0}  # the outage lost no energy


async def test_unreachable_exporter_fails_to_open(aiohttp_server: ServerFactory) -> None:
    app = web.Application()
    server = await aiohttp_server(app)
    url = str(server.make_url("/metrics"))
    await server.close()  # nothing listens on that port any more

    with pytest.raises(MeterError, match="cannot scrape"):
        await asyncio.to_thread(DcgmMeter, url, timeout_s=1.0)
    assert not await asyncio.to_thread(DcgmMeter.is_available, url, 1.0)


async def test_page_without_power_metrics_is_unavailable(aiohttp_server: ServerFactory) -> None:
    exporter = FakeExporter([])
    url = await serve(exporter, aiohttp_server)
    with pytest.raises(MeterUnavailable, match=r"default-counters\.csv"):
        await asyncio.to_thread(DcgmMeter, url)


async def test_an_exporter_slower_than_the_meter_is_reported_once(
    aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = h100s()
    url = await serve(exporter, aiohttp_server)
    clock = ManualClock(0.0)
    meter = await asyncio.to_thread(DcgmMeter, url, interval_s=0.1, clock=clock)

    with caplog.at_level(logging.WARNING, logger="wattproxy.meter.dcgm"):
        for t_s in (0.1, 0.2):  # unchanged for 2 intervals: still within tolerance
            clock.t_s = t_s
            await asyncio.to_thread(meter.read)
        assert "updates more slowly" not in caplog.text
        for t_s in (0.3, 0.4, 0.5):  # unchanged for > 2 intervals
            clock.t_s = t_s
            await asyncio.to_thread(meter.read)

    warnings = [r for r in caplog.records if "updates more slowly" in r.getMessage()]
    assert len(warnings) == 1
    assert "-c 100" in warnings[0].getMessage()


async def test_a_fresh_exporter_raises_no_warning(
    aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = h100s()
    url = await serve(exporter, aiohttp_server)
    clock = ManualClock(0.0)
    meter = await asyncio.to_thread(DcgmMeter, url, interval_s=0.1, clock=clock)
    with caplog.at_level(logging.WARNING, logger="wattproxy.meter.dcgm"):
        for step in range(1, 6):
            clock.t_s = step * 0.1
            for gpu in exporter.gpus:
                gpu.energy_mj += 25_000
            await asyncio.to_thread(meter.read)
    assert "updates more slowly" not in caplog.text


def test_parse_page_takes_only_the_exact_metric_names() -> None:
    page = (
        "# HELP DCGM_FI_DEV_POWER_USAGE_INSTANT Current instantaneous power usage (in W).\n"
        "# TYPE DCGM_FI_DEV_POWER_USAGE_INSTANT gauge\n"
        'DCGM_FI_DEV_POWER_USAGE_INSTANT{gpu="0",UUID="GPU-a"} 999.000000\n'
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).\n"
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
        'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-a"} 88.500000\n'
        "DCGM_FI_DEV_MEMORY_TEMP{gpu=0} not-a-number\n"  # malformed, but not ours to read
    )
    series = parse_page(page)
    assert series["DCGM_FI_DEV_POWER_USAGE"] == [Series({"gpu": "0", "UUID": "GPU-a"}, 88.5)]
    assert series["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == []


def test_select_prefers_the_device_series_over_mig_instance_copies() -> None:
    device_wide = Series({"gpu": "0", "UUID": "GPU-a"}, 400.0)
    instance = Series(
        {"gpu": "0", "UUID": "GPU-a", "GPU_I_PROFILE": "3g.40gb", "GPU_I_ID": "2"}, 400.0
    )
    other = Series({"gpu": "1", "UUID": "GPU-b"}, 100.0)
    assert select([instance, other, device_wide], 0) is device_wide
    assert select([instance, other], "GPU-a") is instance
    assert select([instance, other], 3) is None
