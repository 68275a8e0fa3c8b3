"""A built report as text: CSV (``Accept: text/csv``, ``wattproxy report --format csv``) and
the plain table ``wattproxy report`` prints. Pure."""

from __future__ import annotations

import csv
import io
from typing import Any

from proxy.reports.build import EQUIVALENTS_SOURCE

CSV_FIELDS = (
    "key",
    "requests",
    "energy_j",
    "co2e_g",
    "prompt_tokens",
    "completion_tokens",
    "measured_share",
    "embodied_co2e_g",
    "water_l",
)


def report_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[report.get("group_by", "key"), *CSV_FIELDS[1:]])
    writer.writeheader()
    for g in report["groups"]:
        row = {k: g[k] for k in CSV_FIELDS[1:]}
        row[report.get("group_by", "key")] = g["key"]
        writer.writerow(row)
    total = {k: report["totals"][k] for k in CSV_FIELDS[1:]}
    total[report.get("group_by", "key")] = "TOTAL"
    writer.writerow(total)
    return buf.getvalue()


def report_table(report: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""
    head = report.get("group_by", "key")
    rows = [(g["key"], g) for g in report["groups"]] + [("TOTAL", report["totals"])]
    width = max([len(head), *(len(str(k)) for k, _ in rows)])
    lines = [
        f"Emissions of {report.get('user') or 'everyone'} from {report['from']} to {report['to']}",
        f"{head:<{width}}  {'requests':>9}  {'energy_J':>14}  {'CO2e_g':>12}  {'measured':>8}"
        f"  {'embodied_g':>12}  {'water_L':>12}",
    ]
    for key, t in rows:
        lines.append(
            f"{key!s:<{width}}  {t['requests']:>9}  {t['energy_j']:>14.3f}  "
            f"{t['co2e_g']:>12.6f}  {t['measured_share']:>8.0%}  "
            f"{_opt(t.get('embodied_co2e_g'), 6):>12}  {_opt(t.get('water_l'), 6):>12}"
        )
    eq = report["equivalents"]
    lines.append(
        f"= {eq['smartphone_charges']:.3f} smartphone charges, "
        f"{eq['km_gasoline_car']:.4f} km by gasoline car ({EQUIVALENTS_SOURCE})"
    )
    return "\n".join(lines)


def _opt(value: float | None, digits: int) -> str:
    """A figure, or ``-`` where none is known (not configured)."""
    return "-" if value is None else f"{value:.{digits}f}"
