"""Carbon- and energy-aware routing (issue 15 item 1): the pure choice (``routing.choose``) by
a table and properties, ``Router.serving`` against ``Router.route``, an upstream's own carbon
settings, and the whole path through a real ``wattproxy serve`` with two upstreams serving the
same model in two zones."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from estimators.carbon import (
    CarbonClock,
    CarbonConfig,
    Intensity,
    UKCarbonIntensityProvider,
    deferral_s,
)
from proxy.config import Config, UpstreamConfig, parse_config
from proxy.demo_routing import run_routing_demo
from proxy.errors import ConfigError
from proxy.identity import KeyStore
from proxy.route_policy import upstream_carbon
from proxy.routing import Candidate, RouteLimits, Router, choose
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.serve import base_config, serve_process
from tests.helpers.through_proxy import final_record

NO_LIMITS = RouteLimits()


def _c(name: str, j: float, g: float, pue: float = 1.0, busy: int = 0, fb: float | None = None):
    return Candidate(name, j, g, pue, busy, fb)


CHOICES = [
    # candidates, policy, limits -> chosen name, reason
    ([_c("a", 10, 500)], "least_carbon", NO_LIMITS, "a", "only"),
    ([_c("a", 10, 500), _c("b", 10, 50)], "first", NO_LIMITS, "a", "first"),
    ([_c("a", 10, 500), _c("b", 10, 50)], "least_carbon", NO_LIMITS, "b", "least_carbon"),
    # b uses less energy, but a's grid is so much cleaner that a emits less
    ([_c("a", 20, 50), _c("b", 10, 500)], "least_carbon", NO_LIMITS, "a", "least_carbon"),
    ([_c("a", 20, 50), _c("b", 10, 500)], "least_energy", NO_LIMITS, "b", "least_energy"),
    # PUE counts: 10 J x 1.5 > 12 J x 1.0
    ([_c("a", 10, 100, 1.5), _c("b", 12, 100)], "least_energy", NO_LIMITS, "b", "least_energy"),
    # a tie keeps the router's order
    ([_c("a", 10, 100), _c("b", 10, 100)], "least_carbon", NO_LIMITS, "a", "least_carbon"),
    # the cleaner one is at its in-flight limit: the other, saying why
    (
        [_c("a", 10, 500), _c("b", 10, 50, busy=2)],
        "least_carbon",
        RouteLimits(max_in_flight=2),
        "a",
        "skipped_busy:b",
    ),
    (
        [_c("a", 10, 500, busy=1), _c("b", 10, 50)],
        "first",
        RouteLimits(max_in_flight=1),
        "b",
        "skipped_busy:a",
    ),
    (
        [_c("a", 10, 50, fb=3.0), _c("b", 10, 500, fb=0.1), _c("c", 10, 900)],
        "least_carbon",
        RouteLimits(max_first_byte_s=1.0),
        "b",
        "skipped_slow:a",
    ),
    # every one past a limit: none is skipped
    (
        [_c("a", 10, 500, busy=3), _c("b", 10, 50, busy=3)],
        "least_carbon",
        RouteLimits(max_in_flight=1),
        "b",
        "all_busy",
    ),
]


@pytest.mark.parametrize(("candidates", "policy", "limits", "name", "reason"), CHOICES)
def test_choose_table(
    candidates: list[Candidate], policy: Any, limits: RouteLimits, name: str, reason: str
) -> None:
    index, why = choose(candidates, policy, limits)
    assert (candidates[index].name, why) == (name, reason)


candidate_st = st.builds(
    Candidate,
    name=st.sampled_from(["a", "b", "c", "d"]),
    expected_j=st.floats(0, 1e5),
    g_per_kwh=st.floats(0, 1500),
    pue=st.floats(1.0, 5.0),
    in_flight=st.integers(0, 5),
    first_byte_s=st.none() | st.floats(0, 10),
)
limits_st = st.builds(
    RouteLimits,
    max_in_flight=st.none() | st.integers(1, 5),
    max_first_byte_s=st.none() | st.floats(0.01, 10),
)
policy_st = st.sampled_from(["first", "least_carbon", "least_energy"])


@seed(15)
@settings(max_examples=300, deadline=None)
@given(st.lists(candidate_st, min_size=1, max_size=5), policy_st, limits_st)
def test_choose_property(candidates: list[Candidate], policy: Any, limits: RouteLimits) -> None:
    index, reason = choose(candidates, policy, limits)

    def over(c: Candidate) -> bool:
        busy = limits.max_in_flight is not None and c.in_flight >= limits.max_in_flight
        slow = (
            limits.max_first_byte_s is not None
            and c.first_byte_s is not None
            and c.first_byte_s > limits.max_first_byte_s
        )
        return busy or slow

    eligible = [i for i, c in enumerate(candidates) if not over(c)]
    if len(candidates) == 1:
        assert (index, reason) == (0, "only")
        return
    if eligible:  # never one past a limit while another is within them
        assert index in eligible
    else:
        eligible = list(range(len(candidates)))
        assert reason == "all_busy"
    if policy == "first":
        assert index == eligible[0]
    elif policy == "least_carbon":
        assert candidates[index].expected_g == min(candidates[i].expected_g for i in eligible)
    else:
        assert candidates[index].facility_j == min(candidates[i].facility_j for i in eligible)
    if not any(over(c) for c in candidates):
        assert reason == policy


def test_choose_needs_candidates() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        choose([], "first", NO_LIMITS)


upstream_st = st.builds(
    dict,
    prefix=st.sampled_from(["/", "/v1", "/v1/chat"]),
    models=st.lists(
        st.sampled_from(["*", "llama", "llama-*", "mistral", "m?", "x"]), min_size=1, max_size=3
    ),
)


@seed(15)
@settings(max_examples=300, deadline=None)
@given(
    st.lists(upstream_st, min_size=1, max_size=5),
    st.sampled_from(["/", "/v1/chat/completions", "/v1/models", "/other"]),
    st.none() | st.sampled_from(["llama", "llama-3", "mistral", "m1", "x", "zzz"]),
)
def test_first_equals_todays_routing(ups: list[dict[str, Any]], path: str, model: Any) -> None:
    """``first`` without limits picks ``serving``'s first, which is ``route``'s choice; and
    every upstream ``serving`` offers does serve the request."""
    upstreams = [UpstreamConfig(name=f"u{i}", **u) for i, u in enumerate(ups)]
    router = Router(upstreams)
    serving = router.serving(path, model)
    routed = router.route(path, model)
    assert (serving[0] if serving else None) is routed
    assert all(u in router.candidates(path) for u in serving)
    if serving:
        candidates = [_c(u.name, 1.0, 1.0) for u in serving]
        assert serving[choose(candidates, "first", NO_LIMITS)[0]] is routed


def test_upstream_carbon_settings() -> None:
    section = CarbonConfig(zone="DE", intensity_g_per_kwh=400, pue=1.2)
    plain = UpstreamConfig(name="a")
    assert upstream_carbon(section, plain) is section
    own_pue = UpstreamConfig(name="a", carbon={"pue": 1.5})
    got = upstream_carbon(section, own_pue)
    assert (got.zone, got.intensity_g_per_kwh, got.pue) == ("DE", 400, 1.5)
    # a zone of its own: the section's fixed figure was the section's zone's
    own_zone = UpstreamConfig(name="a", carbon={"zone": "FR"})
    got = upstream_carbon(section, own_zone)
    assert (got.zone, got.intensity_g_per_kwh, got.pue) == ("FR", None, 1.2)


def test_config_same_model_twice_needs_a_policy() -> None:
    ups = [{"name": "a", "models": ["m"]}, {"name": "b", "models": ["m"]}]
    with pytest.raises(ConfigError, match="can never be chosen"):
        parse_config({"upstreams": ups})
    cfg = parse_config({"upstreams": ups, "routing": {"policy": "least_carbon"}})
    assert isinstance(cfg, Config) and cfg.routing.policy == "least_carbon"


def test_config_refuses_an_unknown_upstream_zone() -> None:
    ups = [{"name": "a", "carbon": {"zone": "NOWHERE"}}]
    with pytest.raises(ConfigError, match=r"upstreams\.0\.carbon\.zone"):
        parse_config({"upstreams": ups})


# -- through wattproxy serve -----------------------------------------------------------------

ANSWER = {
    "id": "x",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


class Upstream:
    """An OpenAI-style upstream that counts its requests and, while ``hold`` is set, keeps
    each request waiting until ``release``."""

    def __init__(self) -> None:
        self.served = 0
        self.waiting = 0
        self.hold = False
        self._gate = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.served += 1
        if self.hold:
            self.waiting += 1
            await self._gate.wait()
        return web.json_response(ANSWER)

    def release(self) -> None:
        self._gate.set()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def _chat(s: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    async with s.post(base + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-Wattproxy-Route-Reason"], r.headers["X-Request-Id"]


async def _record(s: aiohttp.ClientSession, base: str, rid: str) -> dict[str, Any]:
    for _ in range(200):
        async with s.get(f"{base}/v1/emissions/requests/{rid}") as r:
            doc: dict[str, Any] = await r.json()
        if doc.get("final"):
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"record {rid} never turned final: {doc}")


def _counter(text: str, upstream: str, reason: str) -> float:
    pattern = (
        rf'^wattproxy_route_decisions_total\{{reason="{re.escape(reason)}",'
        rf'upstream="{upstream}"\}} (\S+)$'
    )
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def _two_zones(dirty_url: str, clean_url: str, tmp_path: Path, **routing: Any) -> dict[str, Any]:
    doc = base_config(dirty_url, tmp_path, routing={"policy": "least_carbon", **routing})
    doc["upstreams"] = [  # the dirty one first: plain `first` routing would pick it
        {
            "name": "dirty",
            "url": dirty_url,
            "models": ["m"],
            "carbon": {"zone": "PL", "intensity_g_per_kwh": 700},
        },
        {
            "name": "clean",
            "url": clean_url,
            "models": ["m"],
            "carbon": {"zone": "FR", "intensity_g_per_kwh": 40},
        },
    ]
    return doc


async def test_serve_least_carbon_and_busy_skip(aiohttp_server: Any, tmp_path: Path) -> None:
    dirty, clean = Upstream(), Upstream()
    dirty_srv = await aiohttp_server(dirty.app())
    clean_srv = await aiohttp_server(clean.app())
    doc = _two_zones(
        str(dirty_srv.make_url("")), str(clean_srv.make_url("")), tmp_path, max_in_flight=1
    )
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        base = served.base
        reason, rid = await _chat(s, base)
        assert reason == "least_carbon"
        assert (clean.served, dirty.served) == (1, 0)
        record = await _record(s, base, rid)
        assert record["upstream"] == "clean" and record["route_reason"] == "least_carbon"

        # the clean one holds a request: it is at its limit, and the dirty one answers
        clean.hold = True
        held = asyncio.ensure_future(_chat(s, base))
        while clean.waiting < 1:
            await asyncio.sleep(0.01)
        reason, rid = await _chat(s, base)
        assert reason == "skipped_busy:clean"
        assert dirty.served == 1
        record = await _record(s, base, rid)
        assert record["upstream"] == "dirty" and record["route_reason"] == "skipped_busy:clean"
        clean.release()
        assert (await held)[0] == "least_carbon"

        async with s.get(base + "/metrics") as r:
            text = await r.text()
    assert _counter(text, "clean", "least_carbon") == 2
    assert _counter(text, "dirty", "skipped_busy:clean") == 1
    assert 'wattproxy_grid_carbon_intensity_grams_per_kwh{zone="FR"} 40.0' in text
    assert 'wattproxy_grid_carbon_intensity_grams_per_kwh{zone="PL"} 700.0' in text


async def test_serve_first_policy_unchanged(aiohttp_server: Any, tmp_path: Path) -> None:
    """The default routes as before: no route header, no counter, no record field."""
    up = Upstream()
    srv = await aiohttp_server(up.app())
    doc = base_config(str(srv.make_url("")), tmp_path)
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        async with s.post(served.base + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert "X-Wattproxy-Route-Reason" not in r.headers
            assert json.loads(await r.read()) == ANSWER
            rid = r.headers["X-Request-Id"]
        record = await _record(s, served.base, rid)
        async with s.get(served.base + "/metrics") as r:
            text = await r.text()
    assert "route_reason" not in record
    assert "wattproxy_route_decisions_total{" not in text


async def test_demo_traffic_follows_the_cleaner_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo: two zones' live intensities (a stand-in Electricity Maps) swap half way, and
    every request of each half goes to the cleaner one."""
    assert await run_routing_demo(tmp_path, requests=10) == 0
    out = capsys.readouterr().out
    assert "5 requests -> paris    (least_carbon)" in out
    assert "5 requests -> warsaw   (least_carbon)" in out
    assert out.index("paris    (least_carbon)") < out.index("warsaw   (least_carbon)")


async def test_serve_reload_with_new_intensities_moves_the_traffic(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """A SIGHUP that gives the upstreams other intensities (new clocks) moves the traffic; the
    policy itself changes live too (under a policy two upstreams may list the same model, so
    going back to ``first`` is refused and the running config stays: not tried here)."""
    dirty, clean = Upstream(), Upstream()
    dirty_srv = await aiohttp_server(dirty.app())
    clean_srv = await aiohttp_server(clean.app())
    doc = _two_zones(str(dirty_srv.make_url("")), str(clean_srv.make_url("")), tmp_path)
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        assert (await _chat(s, served.base))[0] == "least_carbon"
        assert (clean.served, dirty.served) == (1, 0)

        doc["upstreams"][0]["carbon"]["intensity_g_per_kwh"] = 20  # "dirty" is now the clean one
        served.config_path.write_text(yaml.safe_dump(doc))
        served.proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            await _chat(s, served.base)
            if dirty.served:
                break
            await asyncio.sleep(0.05)
        assert dirty.served == 1, served.output()
        before = clean.served
        assert (await _chat(s, served.base))[0] == "least_carbon"
        assert clean.served == before and dirty.served == 2

        # the policy changes live
        doc["routing"] = {"policy": "least_energy"}
        served.config_path.write_text(yaml.safe_dump(doc))
        served.proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            reason, _ = await _chat(s, served.base)
            if reason == "least_energy":
                break
            await asyncio.sleep(0.05)
        assert reason == "least_energy", served.output()


# -- deferral ------------------------------------------------------------------------------

T0 = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)


def _w(offset_s: float, g: float) -> Intensity:
    return Intensity(g, "GB", "test", T0 + timedelta(seconds=offset_s))


DEFERRALS = [
    # now g/kWh, forecast, bound -> seconds to wait
    (300.0, [], 600, 0.0),
    (300.0, [_w(0, 300), _w(1800, 350)], 3600, 0.0),  # nothing lower
    (300.0, [_w(0, 300), _w(1800, 120)], 3600, 1800.0),
    (300.0, [_w(0, 300), _w(1800, 120)], 1000, 0.0),  # the lower window starts past the bound
    (300.0, [_w(900, 200), _w(1800, 120), _w(2700, 120)], 3600, 1800.0),  # lowest, earliest
    (300.0, [_w(-600, 100)], 60, 0.0),  # a lower window already begun: no wait
    (300.0, [Intensity(10, "GB", "test", None)], 60, 0.0),  # no time: ignored
]


@pytest.mark.parametrize(("now_g", "forecast", "bound_s", "wait_s"), DEFERRALS)
def test_deferral_table(
    now_g: float, forecast: list[Intensity], bound_s: float, wait_s: float
) -> None:
    assert deferral_s(now_g, T0, forecast, bound_s) == wait_s


@seed(15)
@settings(max_examples=200, deadline=None)
@given(
    st.floats(0, 1000),
    st.lists(st.tuples(st.floats(-3600, 86400), st.floats(0, 1000)), max_size=8),
    st.floats(0, 86400),
)
def test_deferral_property(now_g: float, windows: list[tuple[float, float]], bound: float) -> None:
    """Never past the bound; a wait only for a window that is lower than now and starts then."""
    wait = deferral_s(now_g, T0, [_w(o, g) for o, g in windows], bound)
    assert 0 <= wait <= bound
    if wait > 0:
        # (timedelta keeps microseconds)
        assert any(abs(max(0.0, o) - wait) < 1e-5 and g < now_g for o, g in windows)


class UKGrid:
    """A stand-in of the GB Carbon Intensity API: 300 g/kWh now, 100 from 3 s on (whole
    seconds: 2 to 3 s from the proxy's now, as the proxy's fetch leaves it)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/intensity", self.now)
        app.router.add_get("/intensity/{start}/fw24h", self.forecast)
        return app

    @staticmethod
    def _period(start: datetime, g: int) -> dict[str, Any]:
        stamp = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"from": stamp, "to": stamp, "intensity": {"forecast": g, "actual": None}}

    async def now(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [self._period(datetime.now(UTC), 300)]})

    async def forecast(self, request: web.Request) -> web.Response:
        now = datetime.now(UTC)
        periods = [self._period(now, 300), self._period(now + timedelta(seconds=3), 100)]
        return web.json_response({"data": periods})


async def test_serve_deferral(aiohttp_server: Any, tmp_path: Path) -> None:
    """With routing.max_deferral_s on, a deferrable request waits for the forecast's lower
    window (within its header's bound) and says so; one that is not deferrable, or whose
    bound is shorter than the wait, goes at once; a bad header is a 400."""
    up = Upstream()
    srv = await aiohttp_server(up.app())
    grid = await aiohttp_server(UKGrid().app())
    doc = base_config(
        str(srv.make_url("")),
        tmp_path,
        carbon={"zone": "GB", "provider": "uk-carbon-intensity", "url": str(grid.make_url(""))},
        routing={"max_deferral_s": 30},
    )
    doc["upstreams"][0]["models"] = ["m"]
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        url = served.base + "/v1/chat/completions"
        async with s.post(url, json=CHAT, headers={"X-Wattproxy-Deferrable": "20"}) as r:
            assert r.status == 200, await r.text()
            waited = float(r.headers["X-Wattproxy-Deferred-S"])
            rid = r.headers["X-Request-Id"]
        assert 0 < waited <= 3.0
        assert (await _record(s, served.base, rid))["deferred_s"] == round(waited, 3)
        async with s.post(url, json=CHAT, headers={"X-Wattproxy-Deferrable": "0.5"}) as r:
            assert r.status == 200 and r.headers["X-Wattproxy-Deferred-S"] == "0.000"
        async with s.post(url, json=CHAT) as r:
            assert r.status == 200 and "X-Wattproxy-Deferred-S" not in r.headers
        async with s.post(url, json=CHAT, headers={"X-Wattproxy-Deferrable": "soon"}) as r:
            assert r.status == 400
            assert "X-Wattproxy-Deferrable" in (await r.json())["error"]["message"]


async def test_serve_deferral_without_forecast_or_off(aiohttp_server: Any, tmp_path: Path) -> None:
    """The static table gives no forecast: no wait. Off by default: the header is ignored."""
    up = Upstream()
    srv = await aiohttp_server(up.app())
    doc = base_config(str(srv.make_url("")), tmp_path, routing={"max_deferral_s": 30})
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        url = served.base + "/v1/chat/completions"
        async with s.post(url, json=CHAT, headers={"X-Wattproxy-Deferrable": "20"}) as r:
            assert r.status == 200 and r.headers["X-Wattproxy-Deferred-S"] == "0.000"
    doc = base_config(str(srv.make_url("")), tmp_path)
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        url = served.base + "/v1/chat/completions"
        async with s.post(url, json=CHAT, headers={"X-Wattproxy-Deferrable": "soon"}) as r:
            assert r.status == 200 and "X-Wattproxy-Deferred-S" not in r.headers


async def test_uk_forecast_parse_and_failures(aiohttp_server: Any) -> None:
    """The GB forecast's half hours become intensities at their start; another zone has none;
    an answer without a data list gives the clock no forecast (logged), not an error."""
    grid = await aiohttp_server(UKGrid().app())
    provider = UKCarbonIntensityProvider(str(grid.make_url("")))
    try:
        now = datetime.now(UTC)
        got = await provider.forecast("GB", now)
        assert got is not None and [w.g_per_kwh for w in got] == [300.0, 100.0]
        assert got[1].at is not None and got[1].at > now
        assert await provider.forecast("FR", now) is None
    finally:
        await provider.close()

    async def garbage(request: web.Request) -> web.Response:
        return web.json_response({"data": "maintenance"})

    bad_app = web.Application()
    bad_app.router.add_get("/intensity/{start}/fw24h", garbage)
    bad = await aiohttp_server(bad_app)
    clock = CarbonClock(UKCarbonIntensityProvider(str(bad.make_url(""))), "GB")
    try:
        assert await clock.forecast(datetime.now(UTC)) is None
    finally:
        await clock.provider.close()


async def test_serve_deferral_by_the_keys_setting(aiohttp_server: Any, tmp_path: Path) -> None:
    """A key with ``deferrable_s`` in the keys file defers its requests without the header; the
    header still wins; a key without it goes at once."""
    up = Upstream()
    srv = await aiohttp_server(up.app())
    grid = await aiohttp_server(UKGrid().app())
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"key": "batch-key", "user": "nightly", "deferrable_s": 20},
                    {"key": "chat-key", "user": "carol"},
                ]
            }
        )
    )
    doc = base_config(
        str(srv.make_url("")),
        tmp_path,
        carbon={"zone": "GB", "provider": "uk-carbon-intensity", "url": str(grid.make_url(""))},
        routing={"max_deferral_s": 30},
        identity={"keys_file": str(keys)},
    )
    doc["upstreams"][0]["models"] = ["m"]
    batch = {"Authorization": "Bearer batch-key"}
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        url = served.base + "/v1/chat/completions"
        async with s.post(url, json=CHAT, headers=batch) as r:
            assert r.status == 200, await r.text()
            assert float(r.headers["X-Wattproxy-Deferred-S"]) > 0
        async with s.post(url, json=CHAT, headers={**batch, "X-Wattproxy-Deferrable": "0.5"}) as r:
            assert r.status == 200 and r.headers["X-Wattproxy-Deferred-S"] == "0.000"
        async with s.post(url, json=CHAT, headers={"Authorization": "Bearer chat-key"}) as r:
            assert r.status == 200 and "X-Wattproxy-Deferred-S" not in r.headers


@pytest.mark.parametrize("value", [-1, "soon", True, float("inf")])
def test_a_keys_deferrable_s_must_be_seconds(tmp_path: Path, value: Any) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"key": "k", "user": "u", "deferrable_s": value}]}))
    with pytest.raises(ConfigError) as err:
        KeyStore.load(keys)
    assert "keys.0: deferrable_s must be a number of seconds >= 0" in str(err.value)


@pytest.mark.parametrize("metered", [True, False])
async def test_an_upstream_with_its_own_grid_is_charged_at_it(
    upstream: TestServer, make_proxy: ProxyFactory, tmp_path: Path, metered: bool
) -> None:
    """An upstream's own ``carbon`` (here 1000 g/kWh against the section's 100) sets the grams
    of its records, measured on its devices or estimated, not only its routing."""
    own_g_per_kwh, section_g_per_kwh = 1000.0, 100.0
    cfg = proxy_config(
        url_of(upstream),
        tmp_path,
        carbon={"intensity_g_per_kwh": section_g_per_kwh},
        upstreams=[
            {
                "name": "llm",
                "url": url_of(upstream),
                "devices": ["gpu0"] if metered else [],
                "carbon": {"intensity_g_per_kwh": own_g_per_kwh},
            }
        ],
    )
    proxy, _ = await make_proxy(cfg)
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 200
        rid = r.headers["X-Request-Id"]
    rec = await final_record(url_of(proxy), rid)
    assert rec["source"] == ("measured" if metered else "estimated")
    assert rec["energy_j"] > 0
    assert rec["co2e_g"] == pytest.approx(rec["energy_j"] * own_g_per_kwh / 3.6e6, rel=1e-3)
