"""A user's emission report as one self-contained HTML page (``wattproxy report --format html``).

Inline CSS and an inline SVG chart, no script, font or image from elsewhere, so the page can be
mailed or archived as it is. Every string that came from a caller (user, team, model, task
names) is escaped. Pure: a report dict and its aggregate rows in, a string out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from datetime import date, timedelta
from typing import Any

from estimators.units import J_PER_WH
from proxy.ledger.base import AggregateRow
from proxy.reports.build import EQUIVALENTS_SOURCE, Totals, group

#: Task colours, in the order tasks are first sorted (colour-blind friendly, Okabe-Ito + extras).
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
    "#8C564B",
    "#7F7F7F",
    "#17BECF",
    "#9467BD",
    "#BCBD22",
    "#2CA02C",
)
CHART_WIDTH_PX = 760
CHART_HEIGHT_PX = 280
MARGIN_LEFT_PX = 64
MARGIN_RIGHT_PX = 12
MARGIN_TOP_PX = 12
MARGIN_BOTTOM_PX = 40
Y_TICKS = 4
LEGEND_ROW_PX = 16
LEGEND_CHAR_PX = 7  # width of one legend character, roughly, at 11 px
#: Days shown at most on the chart (the latest ones); longer periods keep their totals.
MAX_CHART_DAYS = 366

CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #f6f7f9; color: #1d2430; }
main { max-width: 880px; margin: 0 auto; padding: 28px 20px 48px; }
h1 { font-size: 1.5em; margin: 0 0 4px; }
h2 { font-size: 1.1em; margin: 32px 0 10px; }
.sub { color: #5b6472; margin: 0 0 20px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(125px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid #e2e5ea; border-radius: 8px; padding: 12px 14px; }
.card .label { color: #5b6472; font-size: .85em; }
.card .value { font-size: 1.35em; font-weight: 600; margin-top: 2px; }
.panel { background: #fff; border: 1px solid #e2e5ea; border-radius: 8px; padding: 14px; }
svg text { font: 11px system-ui, sans-serif; fill: #3b4350; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px;
          margin: 0 5px 0 2px; vertical-align: -1px; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: .92em; }
th, td { padding: 7px 10px; border-bottom: 1px solid #e9ecf0; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f2f5; font-weight: 600; }
tfoot td { font-weight: 600; }
.share { height: 14px; border-radius: 7px; background: #f2b25c; overflow: hidden; }
.share div { height: 100%; background: #2a8f5b; }
.note { color: #5b6472; font-size: .85em; margin-top: 6px; }
.empty { color: #5b6472; padding: 24px 0; text-align: center; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt_num(value: float) -> str:
    """Three significant digits, never in exponent form (1,196 not 1.2e+03)."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def fmt_g(grams: float) -> str:
    """Grams CO2e for people: mg, g or kg."""
    if grams >= 1000:
        return f"{fmt_num(grams / 1000)} kg"
    if grams >= 1 or grams == 0:
        return f"{fmt_num(grams)} g"
    return f"{fmt_num(grams * 1000)} mg"


def fmt_energy(energy_j: float) -> str:
    """Joules for people: J, Wh or kWh."""
    wh = energy_j / J_PER_WH
    if wh >= 1000:
        return f"{fmt_num(wh / 1000)} kWh"
    if wh >= 1:
        return f"{fmt_num(wh)} Wh"
    return f"{fmt_num(energy_j)} J"


#: The chart's series of embodied (manufacturing) grams, and its colour.
EMBODIED_SERIES = "embodied (manufacturing)"
EMBODIED_COLOR = "#7a7f87"
#: The water chart's colour.
WATER_COLOR = "#3d7fc1"


def _days(start: str, end: str) -> list[str]:
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    if (last - first).days >= MAX_CHART_DAYS:
        first = last - timedelta(days=MAX_CHART_DAYS - 1)
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def _nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * power:
            return step * power
    return 10.0 * power


def task_colors(tasks: Sequence[str]) -> dict[str, str]:
    return {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(sorted(set(tasks)))}


def chart_svg(rows: Sequence[AggregateRow], start: str, end: str) -> str:
    """Grams CO2e per day, stacked by task: one ``rect.bar`` per (day, task) with grams."""
    days = _days(start, end)
    per_day: dict[str, dict[str, float]] = {d: {} for d in days}
    for r in rows:
        if r.day in per_day and r.co2e_g > 0:
            per_day[r.day][r.task] = per_day[r.day].get(r.task, 0.0) + r.co2e_g
    # embodied (manufacturing) grams: a series of their own on top of each day's bar
    embodied_of: dict[str, float] = dict.fromkeys(days, 0.0)
    for r in rows:
        if r.day in embodied_of and r.embodied_co2e_g > 0:
            embodied_of[r.day] += r.embodied_co2e_g
    colors = task_colors([t for tasks in per_day.values() for t in tasks])
    top_g = _nice_max(
        max((sum(t.values()) + embodied_of[d] for d, t in per_day.items()), default=0.0)
    )
    plot_w, plot_h, slot_w, bar_w, base_y = _geometry(len(days))
    parts = [
        '<svg id="daily-chart" xmlns="http://www.w3.org/2000/svg" width="100%" '
        f'viewBox="0 0 {CHART_WIDTH_PX} {{height_px}}" role="img" '
        'aria-label="Grams CO2e per day, stacked by task">'
    ]
    parts.append(_grid(top_g, fmt_g))
    label_every = max(1, len(days) // 10)
    for i, day in enumerate(days):
        x = MARGIN_LEFT_PX + i * slot_w + (slot_w - bar_w) / 2
        y = float(base_y)
        for task in sorted(per_day[day]):
            grams = per_day[day][task]
            h = plot_h * grams / top_g
            y -= h
            parts.append(
                f'<rect class="bar" data-day="{day}" data-task="{_e(task)}" '
                f'data-co2e-g="{grams:.9g}" x="{x:.2f}" y="{y:.2f}" width="{bar_w:.2f}" '
                f'height="{max(h, 0.5):.2f}" fill="{colors[task]}">'
                f"<title>{day} {_e(task)}: {_e(fmt_g(grams))} CO2e</title></rect>"
            )
        embodied_g = embodied_of[day]
        if embodied_g > 0:
            h = plot_h * embodied_g / top_g
            y -= h
            parts.append(
                f'<rect class="bar-embodied" data-day="{day}" data-series="embodied" '
                f'data-co2e-g="{embodied_g:.9g}" x="{x:.2f}" y="{y:.2f}" width="{bar_w:.2f}" '
                f'height="{max(h, 0.5):.2f}" fill="{EMBODIED_COLOR}">'
                f"<title>{day} embodied: {_e(fmt_g(embodied_g))} CO2e</title></rect>"
            )
        if i % label_every == 0:
            parts.append(_day_label(day, x + bar_w / 2, base_y))
    parts.append(_baseline(base_y))
    if any(g > 0 for g in embodied_of.values()):
        colors = {**colors, EMBODIED_SERIES: EMBODIED_COLOR}
    if not colors:
        parts.append(
            f'<text x="{MARGIN_LEFT_PX + plot_w / 2:.1f}" y="{MARGIN_TOP_PX + plot_h / 2:.1f}" '
            f'text-anchor="middle">No emissions in this period</text>'
        )
    legend, legend_rows = _legend(colors, CHART_HEIGHT_PX - 8)
    height_px = CHART_HEIGHT_PX + (legend_rows - 1) * LEGEND_ROW_PX
    parts[0] = parts[0].format(height_px=height_px)
    parts.append(legend)
    parts.append("</svg>")
    return "".join(parts)


def _geometry(n_days: int) -> tuple[float, float, float, float, float]:
    """A daily bar chart's plot width and height, slot and bar widths, and baseline y."""
    plot_w = CHART_WIDTH_PX - MARGIN_LEFT_PX - MARGIN_RIGHT_PX
    plot_h = CHART_HEIGHT_PX - MARGIN_TOP_PX - MARGIN_BOTTOM_PX
    slot_w = plot_w / max(1, n_days)
    return plot_w, plot_h, slot_w, max(1.0, slot_w * 0.72), MARGIN_TOP_PX + plot_h


def _day_label(day: str, x: float, base_y: float) -> str:
    return f'<text x="{x:.1f}" y="{base_y + 16}" text-anchor="middle">{day[5:]}</text>'


def _baseline(base_y: float) -> str:
    return (
        f'<line x1="{MARGIN_LEFT_PX}" x2="{CHART_WIDTH_PX - MARGIN_RIGHT_PX}" y1="{base_y}" '
        f'y2="{base_y}" stroke="#8a93a0"/>'
    )


def _grid(top: float, fmt: Callable[[float], str]) -> str:
    """A chart's horizontal grid lines, labelled from 0 to ``top``."""
    _, plot_h, _, _, base_y = _geometry(1)
    parts = []
    for i in range(Y_TICKS + 1):
        y = base_y - plot_h * i / Y_TICKS
        parts.append(
            f'<line class="grid" x1="{MARGIN_LEFT_PX}" x2="{CHART_WIDTH_PX - MARGIN_RIGHT_PX}" '
            f'y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6eb"/>'
            f'<text x="{MARGIN_LEFT_PX - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_e(fmt(top * i / Y_TICKS))}</text>"
        )
    return "".join(parts)


def water_chart_svg(rows: Sequence[AggregateRow], start: str, end: str) -> str:
    """Litres of water per day (on-site and the grid's): one ``rect.bar-water`` per day with
    water; empty (no chart) when no request had a water figure. Litres are not grams: a chart
    of their own, not a series on the CO2e one."""
    days = _days(start, end)
    litres_of: dict[str, float] = dict.fromkeys(days, 0.0)
    for r in rows:
        if r.day in litres_of and r.water_l > 0:
            litres_of[r.day] += r.water_l
    if not any(v > 0 for v in litres_of.values()):
        return ""
    top_l = _nice_max(max(litres_of.values()))
    _, plot_h, slot_w, bar_w, base_y = _geometry(len(days))
    parts = [
        '<svg id="water-chart" xmlns="http://www.w3.org/2000/svg" width="100%" '
        f'viewBox="0 0 {CHART_WIDTH_PX} {CHART_HEIGHT_PX}" role="img" '
        'aria-label="Litres of water per day">',
        _grid(top_l, lambda v: f"{fmt_num(v)} L"),
    ]
    label_every = max(1, len(days) // 10)
    for i, day in enumerate(days):
        x = MARGIN_LEFT_PX + i * slot_w + (slot_w - bar_w) / 2
        litres = litres_of[day]
        if litres > 0:
            h = plot_h * litres / top_l
            parts.append(
                f'<rect class="bar-water" data-day="{day}" data-water-l="{litres:.9g}" '
                f'x="{x:.2f}" y="{base_y - h:.2f}" width="{bar_w:.2f}" '
                f'height="{max(h, 0.5):.2f}" fill="{WATER_COLOR}">'
                f"<title>{day}: {_e(fmt_num(litres))} L of water</title></rect>"
            )
        if i % label_every == 0:
            parts.append(_day_label(day, x + bar_w / 2, base_y))
    parts.append(_baseline(base_y) + "</svg>")
    return "".join(parts)


def _legend(colors: dict[str, str], first_y: float) -> tuple[str, int]:
    """The chart's legend: a swatch and a name per task, wrapped into rows."""
    parts = ['<g class="legend">']
    x, y, rows = float(MARGIN_LEFT_PX), first_y, 1
    for task, color in colors.items():
        width = 24 + LEGEND_CHAR_PX * len(task)
        if x + width > CHART_WIDTH_PX - MARGIN_RIGHT_PX and x > MARGIN_LEFT_PX:
            x, y, rows = float(MARGIN_LEFT_PX), y + LEGEND_ROW_PX, rows + 1
        parts.append(
            f'<rect class="legend-swatch" x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" '
            f'fill="{color}"/><text x="{x + 14:.1f}" y="{y:.1f}">{_e(task)}</text>'
        )
        x += width
    parts.append("</g>")
    return "".join(parts), rows


def _table(head: str, groups: list[tuple[str, Totals]], total: Totals) -> str:
    out = [
        f"<table><thead><tr><th>{_e(head)}</th><th>requests</th><th>energy</th>"
        "<th>CO2e</th><th>prompt tokens</th><th>completion tokens</th><th>measured</th>"
        "<th>embodied CO2e</th><th>water</th></tr></thead><tbody>"
    ]
    for key, t in groups:
        out.append(f"<tr>{_cells(key or '(none)', t)}</tr>")
    out.append(f"</tbody><tfoot><tr>{_cells('Total', total)}</tr></tfoot></table>")
    return "".join(out)


def _cells(key: str, t: Totals) -> str:
    d = t.to_dict()
    return (
        f"<td>{_e(key)}</td><td>{d['requests']:,}</td>"
        f"<td>{_e(fmt_energy(d['energy_j']))}</td><td>{_e(fmt_g(d['co2e_g']))}</td>"
        f"<td>{d['prompt_tokens']:,}</td><td>{d['completion_tokens']:,}</td>"
        f"<td>{d['measured_share']:.0%}</td>"
        f"<td>{_e(_opt_g(d['embodied_co2e_g']))}</td><td>{_e(_opt_l(d['water_l']))}</td>"
    )


def _opt_g(grams: float | None) -> str:
    return "not configured" if grams is None else fmt_g(grams)


def _opt_l(litres: float | None) -> str:
    return "not configured" if litres is None else f"{fmt_num(litres)} L"


def render_html(report: dict[str, Any], rows: list[AggregateRow]) -> str:
    """The page for ``report`` (``build.build_report``) and the rows it was built from."""
    totals_doc = report["totals"]
    total = Totals()
    for r in rows:
        total.add(r)
    user = report.get("user") or "everyone"
    start, end = str(report["from"]), str(report["to"])
    eq = report.get("equivalents", {})
    share = float(totals_doc.get("measured_share", 0.0))
    cards = [
        ("Requests", f"{totals_doc['requests']:,}"),
        ("Energy", fmt_energy(float(totals_doc["energy_j"]))),
        ("CO2e", fmt_g(float(totals_doc["co2e_g"]))),
        ("Prompt tokens", f"{totals_doc['prompt_tokens']:,}"),
        ("Completion tokens", f"{totals_doc['completion_tokens']:,}"),
        ("Measured", f"{share:.0%}"),
        ("Embodied CO2e", _opt_g(totals_doc.get("embodied_co2e_g"))),
        ("Water", _opt_l(totals_doc.get("water_l"))),
    ]
    card_html = "".join(
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value">{_e(value)}</div></div>'
        for label, value in cards
    )
    measured_j = total.measured_energy_j
    estimated_j = max(0.0, total.energy_j - measured_j)
    water = water_chart_svg(rows, start, end)
    water_panel = (
        f'\n<h2>Litres of water per day</h2>\n<div class="panel" id="water">{water}</div>\n'
        if water
        else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Emissions of {_e(user)}, {_e(start)} to {_e(end)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<h1>Emissions of {_e(user)}</h1>
<p class="sub">{_e(start)} to {_e(end)} (UTC days) &middot; wattproxy</p>
<section class="cards" id="totals">{card_html}</section>

<h2>Grams CO2e per day, by task</h2>
<div class="panel" id="chart">{chart_svg(rows, start, end)}</div>
{water_panel}
<h2>By model</h2>
<section id="by-model">{_table("model", group(rows, "model"), total)}</section>

<h2>By task</h2>
<section id="by-task">{_table("task", group(rows, "task"), total)}</section>

<h2>Measured vs estimated</h2>
<div class="panel" id="measured-share">
<div class="share" title="measured {share:.0%}"><div style="width:{share * 100:.2f}%"></div></div>
<p class="note"><span class="swatch" style="background:#2a8f5b"></span>measured on the
accelerator: {_e(fmt_energy(measured_j))} ({share:.0%}) &nbsp;
<span class="swatch" style="background:#f2b25c"></span>estimated where no meter covered the
request: {_e(fmt_energy(estimated_j))} ({1 - share:.0%})
</p></div>

<h2>Equivalents</h2>
<div class="cards" id="equivalents">
<div class="card"><div class="label">Smartphone charges</div>
<div class="value">{fmt_num(float(eq.get("smartphone_charges", 0.0)))}</div></div>
<div class="card"><div class="label">km by gasoline car</div>
<div class="value">{fmt_num(float(eq.get("km_gasoline_car", 0.0)))}</div></div>
</div>
<p class="note">Source: {_e(EQUIVALENTS_SOURCE)}.</p>
</main>
</body>
</html>
"""
