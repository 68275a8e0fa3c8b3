"""Live carbon-intensity providers against local stand-ins on 127.0.0.1 that serve each API's
real response shape, including HTTP errors, timeouts and nulls, which fall back to the table."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import hdrs, web
from pytest_aiohttp import AiohttpServer

from estimators.carbon import (
    CarbonConfig,
    ElectricityMapsProvider,
    LiveProvider,
    StaticIntensity,
    UKCarbonIntensityProvider,
    WattTimeProvider,
    build_provider,
    table_intensity,
)
from estimators.carbon.watttime import G_PER_KWH_PER_LB_PER_MWH

TIMEOUT_S = 0.3


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Stub:
    """A stand-in API: scripted JSON bodies or statuses per path, and the requests it saw."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[web.Request], Any]] = {}
        self.seen: list[web.Request] = []

    def json(self, path: str, body: Any, status: int = 200) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(body, status=status)

        self.routes[path] = handler

    def slow(self, path: str, delay_s: float) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(delay_s)
            return web.json_response({})

        self.routes[path] = handler

    def text(self, path: str, body: str) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(text=body, content_type="application/json")

        self.routes[path] = handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request)
        handler = self.routes.get(request.path)
        if handler is None:
            return web.json_response({"error": "not found"}, status=404)
        response: web.StreamResponse = await handler(request)
        return response

    def hits(self, path: str) -> int:
        return sum(1 for r in self.seen if r.path == path)


@pytest.fixture
async def stub(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[Stub, str]]:
    s = Stub()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", s.handle)
    server = await aiohttp_server(app)
    yield s, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def providers() -> AsyncIterator[list[LiveProvider]]:
    made: list[LiveProvider] = []
    yield made
    for p in made:
        await p.close()


# -- Electricity Maps -----------------------------------------------------------------------

EM_PATH = "/v3/carbon-intensity/latest"
EM_BODY = {
    "zone": "DE",
    "carbonIntensity": 302,
    "datetime": "2024-05-21T14:00:00.000Z",
    "updatedAt": "2024-05-21T13:42:11.002Z",
    "createdAt": "2024-05-18T14:40:22.000Z",
    "emissionFactorType": "lifecycle",
    "isEstimated": False,
    "estimationMethod": None,
}


def em(base: str, made: list[LiveProvider], clock: FakeClock | None = None) -> LiveProvider:
    p = ElectricityMapsProvider(
        "secret-token", base, refresh_s=300, timeout_s=TIMEOUT_S, clock=clock or FakeClock()
    )
    made.append(p)
    return p


async def test_electricitymaps_latest(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    s.json(EM_PATH, EM_BODY)
    got = await em(base, providers).current("DE")
    assert got.g_per_kwh == 302.0
    assert got.zone == "DE"
    assert got.source == "electricitymaps"
    assert not got.fallback
    assert got.at is not None and got.at.isoformat() == "2024-05-21T14:00:00+00:00"
    request = s.seen[-1]
    assert request.headers["auth-token"] == "secret-token"
    assert request.query["zone"] == "DE"


async def test_electricitymaps_caches_for_refresh_s(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    s.json(EM_PATH, EM_BODY)
    clock = FakeClock()
    p = em(base, providers, clock)
    await p.current("DE")
    clock.now_s += 299
    await p.current("DE")
    assert s.hits(EM_PATH) == 1
    clock.now_s += 2
    await p.current("DE")
    assert s.hits(EM_PATH) == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, {"error": "internal"}),
        (401, {"error": "invalid token"}),
        (200, {**EM_BODY, "carbonIntensity": None}),
        (200, {**EM_BODY, "carbonIntensity": "n/a"}),
        (200, []),
    ],
    ids=["http-500", "http-401", "null", "not-a-number", "not-an-object"],
)
async def test_electricitymaps_failures_fall_back_to_the_table(
    stub: tuple[Stub, str], providers: list[LiveProvider], status: int, body: Any
) -> None:
    s, base = stub
    s.json(EM_PATH, body, status)
    got = await em(base, providers).current("DE")
    assert got.fallback
    assert got.g_per_kwh == table_intensity("DE").g_per_kwh
    assert got.source.startswith("table:")


async def test_electricitymaps_timeout_falls_back(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    s.slow(EM_PATH, TIMEOUT_S * 5)
    got = await em(base, providers).current("FR")
    assert got.fallback
    assert got.g_per_kwh == table_intensity("FR").g_per_kwh
    assert "no answer within" in got.source


async def test_a_failure_is_retried_sooner_than_refresh_s(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    s.json(EM_PATH, {"error": "busy"}, 503)
    clock = FakeClock()
    p = em(base, providers, clock)
    assert (await p.current("DE")).fallback
    s.json(EM_PATH, EM_BODY)
    clock.now_s += 61
    got = await p.current("DE")
    assert not got.fallback and got.g_per_kwh == 302.0


async def test_unreachable_provider_falls_back(providers: list[LiveProvider]) -> None:
    # port 9 (discard) on loopback: nothing listens, the connection is refused
    got = await em("http://127.0.0.1:9", providers).current("US-CAL-CISO")
    assert got.fallback
    assert got.g_per_kwh == table_intensity("US-CAL-CISO").g_per_kwh


async def test_fixed_figure_replaces_the_table_as_fallback(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    s.json(EM_PATH, {}, 500)
    p = ElectricityMapsProvider("t", base, timeout_s=TIMEOUT_S, fixed_g_per_kwh=123.0)
    providers.append(p)
    got = await p.current("DE")
    assert got.fallback and got.g_per_kwh == 123.0 and got.source.startswith("config")


async def test_unknown_zone_falls_back_to_its_country_then_the_world(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    s.json(EM_PATH, {}, 500)
    p = em(base, providers)
    assert (await p.current("DE-XX")).g_per_kwh == table_intensity("DE").g_per_kwh
    assert (await p.current("ZZ-NOWHERE")).g_per_kwh == table_intensity("WORLD").g_per_kwh


# -- UK Carbon Intensity --------------------------------------------------------------------

UK_PATH = "/intensity"


def uk_body(forecast: int | None, actual: int | None) -> dict[str, Any]:
    return {
        "data": [
            {
                "from": "2018-01-20T12:00Z",
                "to": "2018-01-20T12:30Z",
                "intensity": {"forecast": forecast, "actual": actual, "index": "moderate"},
            }
        ]
    }


def uk(base: str, made: list[LiveProvider]) -> LiveProvider:
    p = UKCarbonIntensityProvider(base, timeout_s=TIMEOUT_S, clock=FakeClock())
    made.append(p)
    return p


async def test_uk_actual(stub: tuple[Stub, str], providers: list[LiveProvider]) -> None:
    s, base = stub
    s.json(UK_PATH, uk_body(266, 263))
    got = await uk(base, providers).current("GB")
    assert got.g_per_kwh == 263.0 and not got.fallback
    assert got.source == "uk-carbon-intensity actual"
    assert got.at is not None and got.at.isoformat() == "2018-01-20T12:00:00+00:00"


async def test_uk_actual_null_uses_forecast(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    s.json(UK_PATH, uk_body(266, None))
    got = await uk(base, providers).current("GB")
    assert got.g_per_kwh == 266.0 and got.source == "uk-carbon-intensity forecast"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, uk_body(None, None)),
        (200, {"data": []}),
        (200, {"error": {"code": "400 Bad Request", "message": "Please enter a valid date"}}),
        (500, {"error": "server"}),
    ],
    ids=["both-null", "no-data", "error-object", "http-500"],
)
async def test_uk_failures_fall_back(
    stub: tuple[Stub, str], providers: list[LiveProvider], status: int, body: Any
) -> None:
    s, base = stub
    s.json(UK_PATH, body, status)
    got = await uk(base, providers).current("GB")
    assert got.fallback and got.g_per_kwh == table_intensity("GB").g_per_kwh


async def test_uk_garbage_and_timeout_fall_back(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    s.text(UK_PATH, "<html>maintenance</html>")
    assert (await uk(base, providers).current("GB")).fallback
    s.slow(UK_PATH, TIMEOUT_S * 5)
    assert (await uk(base, providers).current("UK")).fallback


async def test_uk_covers_gb_only(stub: tuple[Stub, str], providers: list[LiveProvider]) -> None:
    s, base = stub
    s.json(UK_PATH, uk_body(266, 263))
    got = await uk(base, providers).current("FR")
    assert got.fallback and got.g_per_kwh == table_intensity("FR").g_per_kwh
    assert s.hits(UK_PATH) == 0


# -- WattTime -------------------------------------------------------------------------------


def watttime_forecast(value: float | None, units: str = "lbs_co2_per_mwh") -> dict[str, Any]:
    return {
        "data": [
            {"point_time": "2024-05-21T14:05:00+00:00", "value": value},
            {"point_time": "2024-05-21T14:10:00+00:00", "value": 900.0},
        ],
        "meta": {
            "data_point_period_seconds": 300,
            "region": "CAISO_NORTH",
            "signal_type": "co2_moer",
            "units": units,
            "warnings": [],
            "model": {"date": "2023-03-01"},
            "generated_at_period_seconds": 300,
            "generated_at": "2024-05-21T14:05:00+00:00",
        },
    }


class WattTimeStub:
    """Login with basic auth, forecast with the bearer token it issued."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub
        self.tokens_issued = 0
        self.reject_next_token = False
        self.forecast: Any = watttime_forecast(800.0)
        self.forecast_status = 200
        stub.routes["/login"] = self.login
        stub.routes["/v3/forecast"] = self.data

    async def login(self, request: web.Request) -> web.StreamResponse:
        scheme, _, encoded = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme != "Basic" or base64.b64decode(encoded).decode() != "ada:pw":
            return web.json_response({"error": "bad credentials"}, status=403)
        self.tokens_issued += 1
        return web.json_response({"token": f"tok{self.tokens_issued}"})

    async def data(self, request: web.Request) -> web.StreamResponse:
        expected = f"Bearer tok{self.tokens_issued}"
        if request.headers.get(hdrs.AUTHORIZATION) != expected or self.reject_next_token:
            self.reject_next_token = False
            return web.json_response({"error": "token expired"}, status=401)
        assert request.query["signal_type"] == "co2_moer"
        assert request.query["region"] == "CAISO_NORTH"
        return web.json_response(self.forecast, status=self.forecast_status)


def wt(base: str, made: list[LiveProvider], password: str = "pw") -> LiveProvider:
    p = WattTimeProvider("ada", password, base, timeout_s=TIMEOUT_S, clock=FakeClock())
    made.append(p)
    return p


async def test_watttime_converts_lbs_per_mwh(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    api = WattTimeStub(s)
    got = await wt(base, providers).current("CAISO_NORTH")
    assert got.g_per_kwh == pytest.approx(800.0 * 0.453592)
    assert G_PER_KWH_PER_LB_PER_MWH == 0.453592
    assert not got.fallback and "marginal" in got.source
    assert got.at is not None and got.at.isoformat() == "2024-05-21T14:05:00+00:00"
    assert api.tokens_issued == 1


async def test_watttime_logs_in_again_on_401(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    api = WattTimeStub(s)
    p = wt(base, providers)
    await p.current("CAISO_NORTH")
    api.reject_next_token = True
    p._cache.clear()  # skip the refresh wait
    got = await p.current("CAISO_NORTH")
    assert not got.fallback
    assert api.tokens_issued == 2


async def test_watttime_bad_credentials_fall_back_to_the_region_table(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    WattTimeStub(s)
    got = await wt(base, providers, password="wrong").current("CAISO_NORTH")
    assert got.fallback
    assert got.zone == "CAISO_NORTH"
    assert got.g_per_kwh == table_intensity("US-CAL-CISO").g_per_kwh


@pytest.mark.parametrize(
    ("status", "forecast"),
    [
        (403, {"error": "subscription required"}),
        (200, watttime_forecast(None)),
        (200, watttime_forecast(55.0, units="percentile")),
        (200, {"data": [], "meta": {}}),
    ],
    ids=["http-403", "null", "percentile", "empty"],
)
async def test_watttime_failures_fall_back(
    stub: tuple[Stub, str], providers: list[LiveProvider], status: int, forecast: Any
) -> None:
    s, base = stub
    api = WattTimeStub(s)
    api.forecast, api.forecast_status = forecast, status
    got = await wt(base, providers).current("CAISO_NORTH")
    assert got.fallback


async def test_watttime_timeout_falls_back(
    stub: tuple[Stub, str], providers: list[LiveProvider]
) -> None:
    s, base = stub
    WattTimeStub(s)
    s.slow("/v3/forecast", TIMEOUT_S * 5)
    assert (await wt(base, providers).current("CAISO_NORTH")).fallback


async def test_watttime_without_credentials_falls_back(providers: list[LiveProvider]) -> None:
    p = WattTimeProvider(None, None, "http://127.0.0.1:9", timeout_s=TIMEOUT_S)
    providers.append(p)
    got = await p.current("ERCOT_EASTTX")
    assert got.fallback and got.g_per_kwh == table_intensity("US-TEX-ERCO").g_per_kwh


# -- factory --------------------------------------------------------------------------------


async def test_factory_builds_each_provider(stub: tuple[Stub, str]) -> None:
    s, base = stub
    s.json(EM_PATH, EM_BODY)
    cfg = CarbonConfig(
        provider="electricitymaps", zone="DE", url=base, token_env="EM_TOKEN", refresh_s=60
    )
    p = build_provider(cfg, environ={"EM_TOKEN": "abc"})
    assert isinstance(p, ElectricityMapsProvider)
    assert p.refresh_s == 60 and p.timeout_s == cfg.timeout_s
    try:
        assert (await p.current("DE")).g_per_kwh == 302.0
        assert s.seen[-1].headers["auth-token"] == "abc"
    finally:
        await p.close()

    uk_p = build_provider(CarbonConfig(provider="uk-carbon-intensity", zone="GB"), environ={})
    assert isinstance(uk_p, UKCarbonIntensityProvider)
    assert uk_p.base_url == "https://api.carbonintensity.org.uk"

    wt_p = build_provider(
        CarbonConfig(provider="watttime", zone="CAISO_NORTH", token_env="WT"),
        environ={"WT": "ada:pw"},
    )
    assert isinstance(wt_p, WattTimeProvider)
    assert (wt_p._username, wt_p._password) == ("ada", "pw")
    wt_default = build_provider(
        CarbonConfig(provider="watttime"), environ={"WATTTIME_USER": "u", "WATTTIME_PASSWORD": "p"}
    )
    assert isinstance(wt_default, WattTimeProvider) and wt_default._username == "u"

    static = build_provider(CarbonConfig(zone="FR"), environ={})
    assert isinstance(static, StaticIntensity)
    assert (await static.current("FR")).g_per_kwh == table_intensity("FR").g_per_kwh
    fixed = build_provider(CarbonConfig(intensity_g_per_kwh=42.0), environ={})
    assert (await fixed.current("WORLD")).g_per_kwh == 42.0
