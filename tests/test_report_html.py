"""The HTML report: one self-contained page with totals, a stacked SVG chart of grams per day by
task, a table by model, the measured share and equivalents; every caller-given string escaped.
Rendered in headless Chromium to check that the chart is really drawn."""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.ledger.base import AggregateRow
from proxy.ledger.sqlite import SQLiteLedger
from proxy.reports import build_report
from proxy.reports.html_page import CHART_HEIGHT_PX, MARGIN_BOTTOM_PX, MARGIN_TOP_PX, render_html
from tests.helpers.ledger_data import record
from tests.helpers.png import colour_counts, hex_rgb

REPO = Path(__file__).resolve().parent.parent
ENSURE_CHROMIUM = REPO / "scripts" / "ensure-chromium.sh"
CHROMIUM_TIMEOUT_S = 120
SVG_NS = "{http://www.w3.org/2000/svg}"
PLOT_HEIGHT_PX = CHART_HEIGHT_PX - MARGIN_TOP_PX - MARGIN_BOTTOM_PX

EVIL_USER = "<script>alert('user')</script>"
EVIL_TASK = "<b>bold-task</b>"
EVIL_MODEL = '"><img src=x onerror=alert(1)>'


def row(
    day: str,
    task: str,
    co2e_g: float,
    model: str | None = "llama",
    user: str = "alice",
    requests: int = 1,
    energy_j: float = 100.0,
    measured_energy_j: float = 50.0,
) -> AggregateRow:
    return AggregateRow(
        day=day,
        user=user,
        team="research",
        task=task,
        model=model,
        upstream="llm",
        requests=requests,
        energy_j=energy_j,
        co2e_g=co2e_g,
        prompt_tokens=10 * requests,
        completion_tokens=20 * requests,
        measured_energy_j=measured_energy_j,
    )


ROWS = [
    row("2026-11-01", "text-generation", 0.5, requests=3),
    row("2026-11-01", "feature-extraction", 0.25, model="bge"),
    row("2026-11-02", "text-generation", 1.0, requests=4),
    row("2026-11-03", "text-to-image", 2.0, model="sdxl", energy_j=4000, measured_energy_j=0),
    row("2026-11-03", "text-generation", 0.5),
    row("2026-11-05", "feature-extraction", 0.125, model="bge"),
]


def page(rows: list[AggregateRow] = ROWS, user: str = "alice") -> str:
    report = build_report(user, date(2026, 11, 1), date(2026, 11, 7), rows, "day")
    return render_html(report, rows)


def chart_of(html_text: str) -> ET.Element:
    match = re.search(r'<svg id="daily-chart".*?</svg>', html_text, re.S)
    assert match is not None, "no chart in the page"
    return ET.fromstring(match.group(0))


def bars(svg: ET.Element) -> list[ET.Element]:
    return [e for e in svg.iter(f"{SVG_NS}rect") if e.get("class") == "bar"]


def test_one_bar_per_day_and_task_stacked_to_scale() -> None:
    svg = chart_of(page())
    found = bars(svg)
    assert sorted((b.get("data-day"), b.get("data-task")) for b in found) == sorted(
        (r.day, r.task) for r in ROWS
    )
    assert sum(float(b.get("data-co2e-g", "0")) for b in found) == pytest.approx(4.375)
    # the tallest day (2.5 g on 11-03) tops a 2.5 g axis; 11-02's 1 g reaches 40 % of it
    day3 = [b for b in found if b.get("data-day") == "2026-11-03"]
    assert sum(float(b.get("height", "0")) for b in day3) == pytest.approx(PLOT_HEIGHT_PX)
    (day2,) = [b for b in found if b.get("data-day") == "2026-11-02"]
    assert float(day2.get("height", "0")) == pytest.approx(0.4 * PLOT_HEIGHT_PX)
    # stacked: one bar sits on the other
    low, high = sorted(day3, key=lambda b: -float(b.get("y", "0")))
    assert float(high.get("y", "0")) + float(high.get("height", "0")) == pytest.approx(
        float(low.get("y", "0"))
    )
    # each task one colour, named in the legend
    colours = {b.get("data-task", ""): b.get("fill") for b in found}
    assert len(set(colours.values())) == 3
    legend = [t.text for g in svg.iter(f"{SVG_NS}g") for t in g.iter(f"{SVG_NS}text")]
    assert legend == sorted(colours)


def test_the_page_shows_totals_models_share_and_equivalents() -> None:
    text = page()
    assert "<title>Emissions of alice, 2026-11-01 to 2026-11-07</title>" in text
    assert '<div class="label">Requests</div><div class="value">11</div>' in text
    assert "4.38 g" in text  # CO2e total
    by_model = re.search(r'<section id="by-model">(.*?)</section>', text, re.S)
    assert by_model is not None
    assert [m for m in ("bge", "llama", "sdxl") if f"<td>{m}</td>" in by_model.group(1)] == [
        "bge",
        "llama",
        "sdxl",
    ]
    # measured 250 J of 4500 J
    assert 'style="width:5.56%"' in text
    assert "Smartphone charges" in text
    assert f"{4.375 / 8.22:.3g}" in text
    assert "km by gasoline car" in text


def test_caller_strings_are_escaped() -> None:
    rows = [row("2026-11-02", EVIL_TASK, 1.0, model=EVIL_MODEL, user=EVIL_USER)]
    text = page(rows, user=EVIL_USER)
    assert "<script>" not in text
    assert "<img" not in text
    assert "<b>bold" not in text
    assert "&lt;script&gt;alert(&#x27;user&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;bold-task&lt;/b&gt;" in text
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    assert len(bars(chart_of(text))) == 1  # still well-formed SVG


def test_the_page_is_self_contained() -> None:
    text = page()
    assert "<script" not in text
    assert "<link" not in text
    assert "@import" not in text
    assert "url(" not in text
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"]
    assert " src=" not in text


def test_an_empty_period_says_so() -> None:
    text = page([])
    assert "No emissions in this period" in text
    assert bars(chart_of(text)) == []


def test_the_cli_writes_the_html_report(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"

    async def fill() -> None:
        led = SQLiteLedger(str(db))
        await led.open()
        await led.write(
            [
                record("h1", user="alice", day="2026-11-02", co2e_g=0.5),
                record("h2", user="alice", day="2026-11-03", co2e_g=0.25, task="text-to-image"),
                record("h3", user="bob", day="2026-11-03", co2e_g=9.0),
            ]
        )
        await led.close()

    asyncio.run(fill())
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"ledger:\n  url: sqlite:///{db}\n")
    out = tmp_path / "report.html"
    code = main(
        [
            "report",
            "--user",
            "alice",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-05",
            "--format",
            "html",
            "--output",
            str(out),
            "--config",
            str(cfg),
        ]
    )
    assert code == 0
    found = bars(chart_of(out.read_text()))
    assert sorted(b.get("data-day", "") for b in found) == ["2026-11-02", "2026-11-03"]
    assert sum(float(b.get("data-co2e-g", "0")) for b in found) == pytest.approx(0.75)


# -- in a real browser ---------------------------------------------------------------------------


@functools.cache
def chromium() -> str | None:
    """The Chromium binary, installed by scripts/ensure-chromium.sh when missing."""
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    subprocess.run(["bash", str(ENSURE_CHROMIUM)], timeout=900, check=False)
    return shutil.which("chromium") or shutil.which("chromium-browser")


def headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
        check=False,
    )


def test_chromium_draws_the_chart(tmp_path: Path) -> None:
    binary = chromium()
    if binary is None:
        pytest.skip("chromium is missing and could not be installed by scripts/ensure-chromium.sh")
    report_file = tmp_path / "report.html"
    text = page()
    report_file.write_text(text, "utf-8")
    url = report_file.as_uri()

    dom = headless(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<svg id="daily-chart"' in dom.stdout
    dom_bars = re.findall(r'<rect class="bar" data-day="([\d-]+)" data-task="([^"]+)"', dom.stdout)
    assert sorted(dom_bars) == sorted((r.day, r.task) for r in ROWS)
    assert dom.stdout.count('class="legend-swatch"') == 3

    shot = tmp_path / "shot.png"
    result = headless(
        binary, tmp_path / "profile-shot", "--window-size=900,700", f"--screenshot={shot}", url
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = colour_counts(shot.read_bytes())
    assert len(counts) > 20, "the screenshot is blank"
    fills = {b.get("fill") for b in bars(chart_of(text))}
    for fill in fills:
        assert fill is not None
        assert counts[hex_rgb(fill)] > 200, f"no {fill} bars on screen"


def test_numbers_are_never_in_exponent_form() -> None:
    from proxy.reports.html_page import fmt_energy, fmt_g

    assert fmt_energy(1196.06) == "1,196 J"
    assert fmt_energy(36_000.0) == "10 Wh"
    assert fmt_g(1_234_567.0) == "1,235 kg"
    assert fmt_g(0.189) == "189 mg"
