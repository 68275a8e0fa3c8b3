"""The carbon clock: grams per joule with PUE, never blocking, refreshed in the background, and
charged per sample so that a request spanning an intensity change pays each part at its rate."""

from __future__ import annotations

import asyncio

import pytest

from estimators.attribution import AttributionEngine, WorkProfile
from estimators.carbon import (
    CarbonClock,
    Intensity,
    IntensityProvider,
    StaticIntensity,
    WattTimeProvider,
    table_intensity,
)
from estimators.errors import CarbonError
from estimators.units import J_PER_KWH, co2e_g


class Scripted(IntensityProvider):
    """Answers the scripted figures in turn; ``None`` raises ``CarbonError``, an exception
    instance is raised as is."""

    name = "scripted"

    def __init__(self, *answers: float | Exception | None) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def current(self, zone: str) -> Intensity:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if answer is None:
            raise CarbonError("scripted failure")
        if isinstance(answer, Exception):
            raise answer
        return Intensity(answer, zone, self.name)


def test_g_per_j_includes_pue_and_starts_from_the_table() -> None:
    clock = CarbonClock(Scripted(400.0), "FR", pue=1.2)
    table = table_intensity("FR").g_per_kwh
    assert clock.g_per_j() == pytest.approx(table * 1.2 / J_PER_KWH)
    assert clock.intensity.zone == "FR" and not clock.intensity.fallback


async def test_refresh_takes_the_providers_figure() -> None:
    clock = CarbonClock(Scripted(400.0), "DE", pue=1.5)
    got = await clock.refresh()
    assert got.g_per_kwh == 400.0
    assert clock.g_per_j() == pytest.approx(400.0 * 1.5 / 3.6e6)
    # one kWh at the accelerator is 1.5 kWh at the meter of the grid: 600 g
    assert J_PER_KWH * clock.g_per_j() == pytest.approx(co2e_g(J_PER_KWH, 400.0, 1.5))


async def test_a_provider_error_falls_back_to_the_table() -> None:
    clock = CarbonClock(Scripted(None), "GB")
    got = await clock.refresh()
    assert got.fallback
    assert got.g_per_kwh == table_intensity("GB").g_per_kwh
    assert "scripted failure" in got.source


async def test_a_static_provider_with_an_unknown_zone_falls_back_to_the_world() -> None:
    clock = CarbonClock(StaticIntensity(), "MARS")
    got = await clock.refresh()
    assert got.fallback and got.g_per_kwh == table_intensity("WORLD").g_per_kwh


async def test_run_refreshes_every_refresh_s_and_survives_errors() -> None:
    provider = Scripted(100.0, RuntimeError("bug"), 300.0)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    clock = CarbonClock(provider, "DE", refresh_s=30.0, sleep=fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        await clock.run()
    assert provider.calls == 3
    assert slept == [30.0, 30.0, 30.0]
    assert clock.intensity.g_per_kwh == 300.0


async def test_run_is_cancellable_as_a_task() -> None:
    clock = CarbonClock(Scripted(200.0), "DE", refresh_s=3600.0)
    task = asyncio.create_task(clock.run())
    await asyncio.sleep(0.01)
    assert clock.intensity.g_per_kwh == 200.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_pue_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        CarbonClock(Scripted(1.0), "DE", pue=0.9)


async def test_co2_of_a_request_spanning_an_intensity_change_is_the_sum_of_its_parts() -> None:
    clock = CarbonClock(Scripted(100.0, 500.0), "DE", pue=1.25)
    engine = AttributionEngine(idle_power_w=0.0)
    profile = WorkProfile(expected_j=1.0)
    engine.sample("gpu0", 0.0, 0.0)
    engine.start("r1", ["gpu0"], 0.0, profile)

    await clock.refresh()  # 100 g/kWh while the first 300 J are drawn
    g1 = clock.g_per_j()
    engine.sample("gpu0", 1.0, 300.0, clock.g_per_j())
    await clock.refresh()  # the grid turns dirtier: 500 g/kWh for the next 200 J
    g2 = clock.g_per_j()
    engine.end("r1", 2.0)
    _, done = engine.sample("gpu0", 2.0, 200.0, clock.g_per_j())

    assert [f.request_id for f in done] == ["r1"]
    flight = done[0]
    assert flight.energy_j == pytest.approx(500.0)
    assert flight.co2e_g == pytest.approx(300.0 * g1 + 200.0 * g2)
    assert flight.co2e_g == pytest.approx(co2e_g(300.0, 100.0, 1.25) + co2e_g(200.0, 500.0, 1.25))
    # not the whole energy at either rate
    assert flight.co2e_g != pytest.approx(co2e_g(500.0, 500.0, 1.25))
    assert flight.co2e_g != pytest.approx(co2e_g(500.0, 100.0, 1.25))


def test_a_watttime_region_starts_from_its_balancing_authority() -> None:
    clock = CarbonClock(WattTimeProvider(None, None), "CAISO_NORTH")
    assert clock.intensity.g_per_kwh == table_intensity("US-CAL-CISO").g_per_kwh
    assert clock.intensity.zone == "CAISO_NORTH"
