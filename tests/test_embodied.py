"""Embodied and water impacts (issue 15, item 3): the pure time split of a device's embodied
grams and its conservation (tables and hypothesis), the shipped table and the config, and the
whole path through a real ``wattproxy serve`` with the simulated meter: records carry embodied
grams and litres, /metrics conserves embodied grams per device, the user report shows totals."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from estimators.attribution import AttributionEngine, WorkProfile
from estimators.embodied import (
    SECONDS_PER_YEAR,
    device_embodied,
    device_table,
    split_embodied,
    water_l_per_j,
)
from estimators.meters import MeterConfig
from proxy.ledger.base import AggregateRow
from proxy.reports import build_report, render_html, report_csv, report_table
from proxy.standins import StandIn
from tests.helpers.serve import ROOT, WATTPROXY, base_config, final_record, serve_process

# -- the pure split ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spans", "attributed", "unattributed"),
    [
        ({}, {}, 10.0),  # nobody in flight: all unattributed
        ({"a": (0.0, 10.0)}, {"a": 10.0}, 0.0),  # the whole interval
        ({"a": (2.0, 7.0)}, {"a": 5.0}, 5.0),  # half of it
        ({"a": (-5.0, 20.0)}, {"a": 10.0}, 0.0),  # clipped to the interval
        ({"a": (0.0, 10.0), "b": (0.0, 10.0)}, {"a": 5.0, "b": 5.0}, 0.0),  # shared time
        # the union is charged (6 s), by overlap share (4 : 4)
        ({"a": (0.0, 4.0), "b": (2.0, 6.0)}, {"a": 3.0, "b": 3.0}, 4.0),
        ({"a": (0.0, 2.0), "b": (5.0, 8.0)}, {"a": 2.0, "b": 3.0}, 5.0),  # disjoint
        ({"a": (11.0, 12.0)}, {}, 10.0),  # outside it
    ],
)
def test_split_embodied_table(
    spans: dict[str, tuple[float, float]], attributed: dict[str, float], unattributed: float
) -> None:
    got = split_embodied(1.0, 0.0, 10.0, spans)
    assert got.attributed_g == pytest.approx(attributed)
    assert got.unattributed_g == pytest.approx(unattributed)


_span = st.tuples(st.floats(-5, 15), st.floats(0, 10)).map(lambda t: (t[0], t[0] + t[1]))


@given(
    rate=st.floats(0, 1e3),
    t0=st.floats(-100, 100),
    length=st.floats(0, 50),
    spans=st.dictionaries(st.sampled_from("abcdefgh"), _span, max_size=8),
)
def test_split_embodied_conserves(
    rate: float, t0: float, length: float, spans: dict[str, tuple[float, float]]
) -> None:
    """attributed + unattributed = rate x seconds; nobody negative, nobody past its overlap's
    worth, the charged grams never past the union of their time."""
    shifted = {k: (t0 + lo, t0 + hi) for k, (lo, hi) in spans.items()}
    got = split_embodied(rate, t0, t0 + length, shifted)
    total = rate * length
    assert sum(got.attributed_g.values()) + got.unattributed_g == pytest.approx(
        total, rel=1e-9, abs=1e-9
    )
    assert got.unattributed_g >= 0.0
    for rid, g in got.attributed_g.items():
        lo, hi = shifted[rid]
        assert 0.0 <= g <= rate * (min(hi, t0 + length) - max(lo, t0)) * (1 + 1e-9) + 1e-9


@given(
    events=st.lists(
        st.tuples(st.sampled_from(["start", "end", "sample"]), st.floats(0.0, 2.0)),
        max_size=40,
    ),
    rate=st.floats(1e-6, 10.0),
)
def test_engine_conserves_embodied_per_device(events: list[tuple[str, float]], rate: float) -> None:
    """Through the engine, with requests starting and ending on two devices between samples:
    per device, attributed + unattributed = rate x (latest - first sample), and the flights'
    grams add up to the attributed."""
    engine = AttributionEngine(embodied_g_per_s={"gpu0": rate, "gpu1": rate / 2})
    t = 0.0
    flights: list[Any] = []
    open_ids: list[str] = []
    first: dict[str, float] = {}
    for i, (kind, step) in enumerate(events):
        t += step
        if kind == "start":
            rid = f"r{i}"
            devs = ("gpu0", "gpu1") if i % 2 else ("gpu0",)
            flights.append(engine.start(rid, devs, t, WorkProfile()))
            open_ids.append(rid)
        elif kind == "end" and open_ids:
            engine.end(open_ids.pop(0), t)
        else:
            for d in ("gpu0", "gpu1"):
                first.setdefault(d, t)
                engine.sample(d, t, 1.0)
    attributed = sum(f.embodied_g for f in flights)
    booked = 0.0
    for d, r in (("gpu0", rate), ("gpu1", rate / 2)):
        tot = engine.devices.get(d)
        if tot is None or d not in first:
            continue
        assert tot.last_sample_s is not None
        expected = r * (tot.last_sample_s - first[d])
        assert tot.embodied_g == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert tot.attributed_embodied_g + tot.unattributed_embodied_g == pytest.approx(
            tot.embodied_g, rel=1e-9, abs=1e-9
        )
        booked += tot.attributed_embodied_g
    assert attributed == pytest.approx(booked, rel=1e-9, abs=1e-9)


def test_no_figures_no_embodied() -> None:
    """Without figures, a flight's embodied grams are ``None`` (absent), never a made-up 0."""
    engine = AttributionEngine()
    f = engine.start("r", ("gpu0",), 0.0, WorkProfile())
    engine.sample("gpu0", 0.0, 0.0)
    outcome, _ = engine.sample("gpu0", 1.0, 1.0)
    assert f.embodied_g is None and outcome.embodied is None


# -- figures and config ------------------------------------------------------------------------


def test_device_figures_from_config_and_table() -> None:
    own = device_embodied(150.0, 5.0, None)
    assert own is not None and own.source == "config"
    assert own.rate_g_per_s == pytest.approx(150_000.0 / (5 * SECONDS_PER_YEAR))
    table = device_embodied(None, 4.0, "a100")
    assert table is not None and table.embodied_kg_co2e == device_table()["A100"].embodied_kg_co2e
    assert table.source.startswith("table:") and "Chien" in table.source
    assert device_embodied(None, None, None) is None
    with pytest.raises(ValueError, match="lifetime_years"):
        device_embodied(150.0, None, None)
    with pytest.raises(ValueError, match="not in the shipped table"):
        device_embodied(None, 4.0, "no-such-gpu")


def test_every_table_row_names_its_source() -> None:
    """Each row: a positive figure, what it covers (the card alone, or a GPU's share of a
    server), the publication, its year and address, and how the figure was derived."""
    for model, entry in device_table().items():
        assert entry.source.strip(), model
        assert entry.embodied_kg_co2e > 0, model
        assert entry.scope in {"card", "server-share"}, model
        assert 2000 <= entry.year <= 2030, model
        assert entry.url.startswith("https://"), model
        assert entry.derivation.strip(), model


@pytest.mark.parametrize(
    ("model", "kg", "scope"),
    [
        # ADEME/Hubblo GPU LCA: per-component GWP summed (manufacturing, transport, end of life)
        ("A100-PCIE-40GB", 122.0, "card"),
        ("A100-SXM4-40GB", 113.5, "card"),
        ("L4", 57.7, "card"),
        ("H100-PCIE-80GB", 170.1, "card"),
        ("GH200", 211.8, "card"),
        ("A100", 318.0, "server-share"),  # Chien et al.: 1/8 of an 8-GPU instance
    ],
)
def test_the_shipped_figures(model: str, kg: float, scope: str) -> None:
    entry = device_table()[model]
    assert (entry.embodied_kg_co2e, entry.scope) == (pytest.approx(kg), scope)
    got = device_embodied(None, 4.0, model.lower())  # the model name's case does not matter
    assert got is not None and got.embodied_kg_co2e == pytest.approx(kg)
    assert got.source.startswith("table:")


def test_devices_without_a_public_figure_are_not_shipped() -> None:
    """docs/estimates.md lists these as not shipped; a config naming one is refused."""
    doc = (ROOT / "docs" / "estimates.md").read_text("utf-8")
    not_shipped = doc[doc.index("**Not shipped: no public source found**") :]
    for model, named in (
        ("H100-SXM5-80GB", "H100 SXM5"),
        ("H200", "H200"),
        ("A10G", "A10G"),
        ("L40S", "L40S"),
        ("T4", "T4"),
        ("V100", "V100"),
        ("MI300X", "MI300X"),
    ):
        assert named in not_shipped[:1200], named
        assert model not in device_table()
        with pytest.raises(ValueError, match="not in the shipped table"):
            device_embodied(None, 4.0, model)


def test_meter_config_validates_embodied() -> None:
    cfg = MeterConfig.model_validate(
        {"devices": {"gpu0": {"index": 0, "model": "A100", "lifetime_years": 4}}}
    )
    assert set(cfg.embodied()) == {"gpu0"}
    with pytest.raises(ValueError, match="lifetime_years"):
        MeterConfig.model_validate({"devices": {"gpu0": {"index": 0, "embodied_kg_co2e": 1}}})
    with pytest.raises(ValueError, match="not in the shipped table"):
        MeterConfig.model_validate(
            {"devices": {"gpu0": {"index": 0, "model": "X9", "lifetime_years": 4}}}
        )


@pytest.mark.parametrize(
    ("wue", "grid", "pue", "expected"),
    [
        (None, 1.0, 1.0, None),
        (1.0, None, 1.0, None),
        (0.0, 0.0, 1.0, 0.0),
        (1.8, 3.0, 1.2, (1.8 + 1.2 * 3.0) / 3.6e6),
    ],
)
def test_water_per_joule(
    wue: float | None, grid: float | None, pue: float, expected: float | None
) -> None:
    got = water_l_per_j(wue, grid, pue)
    assert got == (pytest.approx(expected) if expected is not None else None)


# -- through wattproxy serve -------------------------------------------------------------------

EMBODIED_KG = 150_000.0  # large, so that a test's seconds give grams well above rounding
LIFETIME_Y = 1.0
RATE_G_PER_S = EMBODIED_KG * 1000.0 / (LIFETIME_Y * SECONDS_PER_YEAR)
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "one two three four"}]}


def _sum(text: str, family: str, **labels: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{family}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def test_serve_charges_embodied_and_water(aiohttp_server: Any, tmp_path: Path) -> None:
    upstream = await aiohttp_server(StandIn(scale=0.02).app())
    doc = base_config(str(upstream.make_url("")).rstrip("/"), tmp_path)
    doc["meter"]["devices"] = {
        "gpu0": {"index": 0, "embodied_kg_co2e": EMBODIED_KG, "lifetime_years": LIFETIME_Y}
    }
    doc["carbon"] = {"pue": 1.2, "wue_l_per_kwh": 1.8, "grid_water_l_per_kwh": 3.0}
    doc["identity"] = {"allow_header_identity": True}
    launched = time.monotonic()
    async with serve_process(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        base = served.base
        rids = []
        for _ in range(3):
            async with s.post(
                base + "/v1/chat/completions", json=CHAT, headers={"X-Wattproxy-User": "dana"}
            ) as r:
                assert r.status == 200, await r.text()
                await r.read()
                rids.append(r.headers["X-Request-Id"])
        records = [await final_record(s, base, rid) for rid in rids]
        async with s.get(base + "/metrics") as r:
            metrics = await r.text()
        elapsed_s = time.monotonic() - launched  # the device's sampled time is within it
        deadline = time.monotonic() + 30
        while True:  # the ledger's aggregates catch up with the records (bounded wait)
            async with s.get(base + "/v1/emissions/users/dana") as r:
                report = await r.json()
            if report["totals"]["requests"] == 3:
                break
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.05)
        async with s.get(base + "/v1/emissions/users/dana", headers={"Accept": "text/csv"}) as r:
            csv_text = await r.text()
    for rec in records:
        assert rec["embodied_co2e_g"] > 0
        assert rec["water_l"] > 0
        assert rec["water_l"] == pytest.approx(rec["energy_j"] * (1.8 + 1.2 * 3.0) / 3.6e6)
        # charged at most the device's rate over its life on the device (plus a sample either side)
        assert rec["embodied_co2e_g"] <= RATE_G_PER_S * (rec["duration_s"] + 1.0)
    attributed = _sum(metrics, "wattproxy_embodied_co2e_grams_total")
    unattributed = _sum(metrics, "wattproxy_unattributed_embodied_co2e_grams_total", device="gpu0")
    device = _sum(metrics, "wattproxy_device_embodied_co2e_grams_total", device="gpu0")
    assert attributed == pytest.approx(sum(r["embodied_co2e_g"] for r in records), rel=1e-6)
    assert attributed + unattributed == pytest.approx(device, rel=1e-6)
    assert 0 < device <= RATE_G_PER_S * elapsed_s
    assert _sum(metrics, "wattproxy_water_litres_total") == pytest.approx(
        sum(r["water_l"] for r in records), rel=1e-6
    )
    totals = report["totals"]
    assert totals["embodied_co2e_g"] == pytest.approx(attributed, rel=1e-6)
    assert totals["water_l"] == pytest.approx(sum(r["water_l"] for r in records), rel=1e-6)
    assert sum(g["embodied_co2e_g"] for g in report["groups"]) == pytest.approx(
        attributed, rel=1e-6
    )
    assert csv_text.splitlines()[0].endswith(",embodied_co2e_g,water_l")
    # the HTML page and the terminal table of `wattproxy report`, from the same ledger
    html, table = (
        subprocess.run(
            [
                *WATTPROXY,
                "report",
                "--config",
                str(served.config_path),
                *("--user", "dana"),
                "--format",
                fmt,
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        ).stdout
        for fmt in ("html", "table")
    )
    assert 'class="bar-embodied"' in html and "Embodied CO2e" in html
    assert "embodied (manufacturing)" in html  # the chart's series, in its legend
    water_bars = re.findall(r'class="bar-water" data-day="[^"]+" data-water-l="([^"]+)"', html)
    assert sum(float(v) for v in water_bars) == pytest.approx(totals["water_l"], rel=1e-6)
    assert "not configured" not in html
    assert "embodied_g" in table and "water_L" in table


def test_report_says_not_configured_rather_than_zero() -> None:
    """Rows of requests without figures give ``null`` embodied and water in the report's
    totals and groups, ``-`` in the table and "not configured" on the page, never 0; rows with
    figures give their sums, and the page's chart draws the embodied series."""
    bare = AggregateRow(
        "2026-11-29", "u", None, "text-generation", "m", "llm", 2, 10.0, 0.1, 1, 2, 10.0
    )
    start = end = date(2026, 11, 29)
    report = build_report("u", start, end, [bare])
    assert report["totals"]["embodied_co2e_g"] is None
    assert report["totals"]["water_l"] is None
    assert report["groups"][0]["embodied_co2e_g"] is None
    assert report["totals"]["co2e_g"] == pytest.approx(0.1)  # existing fields unchanged
    assert "-" in report_table(report).splitlines()[-2]
    assert report_csv(report).splitlines()[-1].endswith(",,")
    page = render_html(report, [bare])
    assert "not configured" in page and 'class="bar-embodied"' not in page
    known = replace(bare, embodied_co2e_g=0.4, embodied_requests=2, water_l=0.002, water_requests=2)
    report = build_report("u", start, end, [known])
    assert report["totals"]["embodied_co2e_g"] == pytest.approx(0.4)
    assert report["totals"]["water_l"] == pytest.approx(0.002)
    page = render_html(report, [known])
    assert 'data-series="embodied" data-co2e-g="0.4"' in page
    # water: a chart of its own (litres, not grams), a bar per day with the day's litres
    assert 'id="water-chart"' in page
    assert 'class="bar-water" data-day="2026-11-29" data-water-l="0.002"' in page
    assert 'id="water-chart"' not in render_html(build_report("u", start, end, [bare]), [bare])
