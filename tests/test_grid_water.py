"""The grid's water intensity by zone (issue 15, item 3): the shipped table and its sources,
the lookup (zone, then its country), ``carbon.grid_water_from_table`` (a configured figure
wins; a zone the table lacks is refused naming the key, by ``check-config`` too), and the
table's figure reaching a request's ``water_l`` through a real ``wattproxy serve``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from estimators.carbon import CarbonConfig, grid_water, grid_water_table
from estimators.carbon.grid_water import L_PER_GAL, MACKNICK_GAL_PER_MWH, mix_water_l_per_kwh
from proxy.config import ConfigError, parse_config
from proxy.standins import StandIn
from tests.helpers.serve import ROOT, WATTPROXY, base_config, final_record, serve_process

# -- the table -----------------------------------------------------------------------------------


def test_every_row_names_its_source_and_mix_year() -> None:
    table = grid_water_table()
    assert {"US", "FR", "DE", "NO", "IN", "CN"} <= set(table)
    for zone, row in table.items():
        assert row.l_per_kwh >= 0, zone
        assert "Macknick" in row.source and row.mix_year == 2021, zone
        assert 0.9 <= row.coverage <= 1.0, zone  # the factors cover at least 90 % of the mix


def test_the_arithmetic_of_a_row_from_its_published_inputs() -> None:
    """US, 2021 (OWID via CodeCarbon's global_energy_mix.json), TWh: coal 898.0, gas 1579.19,
    oil 35.2 (no factor), nuclear 779.65, hydro 246.47, biofuel 54.25, solar 164.42,
    wind 378.2, other renewables 18.24 (no factor). The table's figure is the factors' mean
    over the covered generation; the coverage is that generation's share of the total."""
    mix = {
        "coal": 898.0,
        "gas": 1579.19,
        "oil": 35.2,
        "nuclear": 779.65,
        "hydro": 246.47,
        "biofuel": 54.25,
        "solar": 164.42,
        "wind": 378.2,
        "other_renewable": 18.24,  # geothermal and the like: no factor either
    }
    l_per_kwh, coverage = mix_water_l_per_kwh(mix)
    covered = sum(v for k, v in mix.items() if k in MACKNICK_GAL_PER_MWH)
    expected = (
        sum(v * MACKNICK_GAL_PER_MWH[k] for k, v in mix.items() if k in MACKNICK_GAL_PER_MWH)
        / covered
        * L_PER_GAL
        / 1000
    )
    assert l_per_kwh == pytest.approx(expected)
    assert coverage == pytest.approx(covered / sum(mix.values()))
    assert grid_water_table()["US"].l_per_kwh == pytest.approx(round(expected, 2))
    assert grid_water_table()["US"].coverage == pytest.approx(round(coverage, 3))


@pytest.mark.parametrize(
    ("zone", "found"),
    [
        ("FR", "FR"),
        ("fr", "FR"),  # case does not matter
        ("US-CAL-CISO", "US"),  # a sub-national zone takes its country's figure
        ("DE-LU", "DE"),
        ("WORLD", None),  # no world mix in the source: no figure, never a made-up one
        ("NOWHERE", None),
    ],
)
def test_lookup_by_zone_then_country(zone: str, found: str | None) -> None:
    got = grid_water(zone)
    if found is None:
        assert got is None
    else:
        assert got is not None and got.zone == found
        assert got.l_per_kwh == grid_water_table()[found].l_per_kwh


# -- config --------------------------------------------------------------------------------------


def test_the_table_fills_grid_water_when_asked_and_a_configured_figure_wins() -> None:
    fr = grid_water_table()["FR"].l_per_kwh
    cfg = CarbonConfig.model_validate({"zone": "FR", "grid_water_from_table": True})
    assert cfg.grid_water_l_per_kwh == pytest.approx(fr)
    own = CarbonConfig.model_validate(
        {"zone": "FR", "grid_water_from_table": True, "grid_water_l_per_kwh": 1.5}
    )
    assert own.grid_water_l_per_kwh == 1.5
    assert CarbonConfig.model_validate({"zone": "FR"}).grid_water_l_per_kwh is None  # opt-in


def test_a_zone_the_water_table_lacks_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"carbon": {"grid_water_from_table": True}}, "c.yaml", environ={})
    (problem,) = err.value.problems
    assert problem.startswith("c.yaml: carbon.grid_water_from_table: zone 'WORLD' has no")
    assert "carbon.grid_water_l_per_kwh" in problem and "FR" in problem
    # a figure of one's own needs no table
    parse_config(
        {"carbon": {"grid_water_from_table": True, "grid_water_l_per_kwh": 2.0}},
        "c.yaml",
        environ={},
    )


def test_env_overrides_reach_the_table() -> None:
    cfg = parse_config(
        {},
        "c.yaml",
        environ={
            "WATTPROXY_CARBON__ZONE": "DE",
            "WATTPROXY_CARBON__GRID_WATER_FROM_TABLE": "true",
        },
    )
    assert cfg.carbon.grid_water_l_per_kwh == grid_water_table()["DE"].l_per_kwh


def test_check_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"carbon": {"zone": "JP", "grid_water_from_table": True}}))
    ok = subprocess.run(
        [*WATTPROXY, "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert ok.returncode == 0, ok.stderr
    path.write_text(
        yaml.safe_dump(
            {
                "carbon": {
                    "zone": "CAISO_NORTH",
                    "provider": "watttime",
                    "grid_water_from_table": True,
                }
            }
        )
    )
    bad = subprocess.run(
        [*WATTPROXY, "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert f"{path}: carbon.grid_water_from_table: zone 'CAISO_NORTH' has no" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- through wattproxy serve -------------------------------------------------------------------

CHAT = {"model": "llama", "messages": [{"role": "user", "content": "one two three four"}]}


async def test_serve_takes_the_zones_water_from_the_table(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    upstream = await aiohttp_server(StandIn(scale=0.02).app())
    doc = base_config(str(upstream.make_url("")).rstrip("/"), tmp_path)
    doc["carbon"] = {"zone": "FR", "pue": 1.2, "wue_l_per_kwh": 0.5, "grid_water_from_table": True}
    doc["identity"] = {"allow_header_identity": True}
    fr = grid_water_table()["FR"].l_per_kwh
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        async with s.post(
            served.base + "/v1/chat/completions", json=CHAT, headers={"X-Wattproxy-User": "eve"}
        ) as r:
            assert r.status == 200, await r.text()
            await r.read()
            rid = r.headers["X-Request-Id"]
        rec = await final_record(s, served.base, rid)
    assert rec["energy_j"] > 0
    assert rec["water_l"] == pytest.approx(rec["energy_j"] * (0.5 + 1.2 * fr) / 3.6e6)


async def test_serve_charges_each_upstream_the_water_of_its_own_zone(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """Two upstreams serving one model in two zones (carbon-aware routing's setup): each
    record's litres use its upstream's zone row and PUE, not the section's."""
    near = await aiohttp_server(StandIn(scale=0.02).app())
    far = await aiohttp_server(StandIn(scale=0.02).app())
    doc = base_config(str(near.make_url("")).rstrip("/"), tmp_path)
    doc["carbon"] = {"zone": "FR", "pue": 1.2, "wue_l_per_kwh": 0.5, "grid_water_from_table": True}
    doc["upstreams"] = [
        {"name": "fr", "url": str(near.make_url("")).rstrip("/"), "models": ["fr-*"]},
        {
            "name": "de",
            "url": str(far.make_url("")).rstrip("/"),
            "models": ["de-*"],
            "carbon": {"zone": "DE", "pue": 1.5},
        },
    ]
    table = grid_water_table()
    fr, de = table["FR"].l_per_kwh, table["DE"].l_per_kwh
    assert fr != de
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        records = {}
        for model in ("fr-m", "de-m"):
            async with s.post(
                served.base + "/v1/chat/completions", json={**CHAT, "model": model}
            ) as r:
                assert r.status == 200, await r.text()
                await r.read()
                records[model] = await final_record(s, served.base, r.headers["X-Request-Id"])
    fr_rec, de_rec = records["fr-m"], records["de-m"]
    assert fr_rec["water_l"] == pytest.approx(fr_rec["energy_j"] * (0.5 + 1.2 * fr) / 3.6e6)
    assert de_rec["water_l"] == pytest.approx(de_rec["energy_j"] * (0.5 + 1.5 * de) / 3.6e6)


def test_an_upstream_zone_the_water_table_lacks_is_refused_naming_it() -> None:
    doc = {
        "carbon": {"zone": "FR", "wue_l_per_kwh": 0.5, "grid_water_from_table": True},
        "upstreams": [{"name": "x", "carbon": {"zone": "XX-NOWHERE", "intensity_g_per_kwh": 100}}],
    }
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert any("upstreams.0.carbon.zone" in p and "water" in p for p in err.value.problems)
