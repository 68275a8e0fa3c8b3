"""Per-user emission reports from ledger aggregates: totals, groups, equivalents. Pure."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from proxy.ledger.base import AggregateRow

GROUP_BY = ("day", "task", "model", "upstream", "user", "team")

#: US EPA, "Greenhouse Gas Equivalencies Calculator - Calculations and References" (2024):
#: 8.22e-6 t CO2 per smartphone charged; 3.93e-4 t CO2e per mile of an average gasoline
#: passenger vehicle (= 244.2 g per km).
G_PER_SMARTPHONE_CHARGE = 8.22
G_PER_KM_GASOLINE_CAR = 393.0 / 1.609344
EQUIVALENTS_SOURCE = "US EPA Greenhouse Gas Equivalencies Calculator (2024)"


@dataclass(slots=True)
class Totals:
    requests: int = 0
    energy_j: float = 0.0
    co2e_g: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    measured_energy_j: float = 0.0

    def add(self, row: AggregateRow) -> None:
        self.requests += row.requests
        self.energy_j += row.energy_j
        self.co2e_g += row.co2e_g
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.measured_energy_j += row.measured_energy_j

    def to_dict(self) -> dict[str, Any]:
        share = self.measured_energy_j / self.energy_j if self.energy_j > 0 else 0.0
        return {
            "requests": self.requests,
            "energy_j": round(self.energy_j, 6),
            "co2e_g": round(self.co2e_g, 9),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "measured_share": round(min(1.0, share), 6),
        }


def parse_day(value: str | None, default: date) -> date:
    """An ISO date or datetime (``2026-11-01``, ``2026-11-01T10:00:00Z``); raises ValueError."""
    if not value:
        return default
    if len(value) == 10:
        return date.fromisoformat(value)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).date()


def default_period(today: date | None = None) -> tuple[date, date]:
    """The last 30 days, today included."""
    end = today or datetime.now(UTC).date()
    return end - timedelta(days=29), end


def equivalents(co2e_g: float) -> dict[str, float]:
    return {
        "smartphone_charges": round(co2e_g / G_PER_SMARTPHONE_CHARGE, 6),
        "km_gasoline_car": round(co2e_g / G_PER_KM_GASOLINE_CAR, 6),
    }


def _key(row: AggregateRow, group_by: str) -> str:
    value = getattr(row, group_by)
    return value if value is not None else ""


def group(rows: Iterable[AggregateRow], group_by: str) -> list[tuple[str, Totals]]:
    groups: dict[str, Totals] = {}
    for row in rows:
        groups.setdefault(_key(row, group_by), Totals()).add(row)
    return sorted(groups.items())


def build_report(
    user: str | None,
    start: date,
    end: date,
    rows: Sequence[AggregateRow],
    group_by: str = "day",
) -> dict[str, Any]:
    """The SPEC's report shape."""
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
    totals = Totals()
    for row in rows:
        totals.add(row)
    report: dict[str, Any] = {
        "user": user,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "group_by": group_by,
        "totals": totals.to_dict(),
        "groups": [{"key": k, **t.to_dict()} for k, t in group(rows, group_by)],
        "equivalents": equivalents(totals.co2e_g),
        "equivalents_source": EQUIVALENTS_SOURCE,
    }
    return report


def build_summary(start: date, end: date, rows: Sequence[AggregateRow]) -> dict[str, Any]:
    totals = Totals()
    for row in rows:
        totals.add(row)
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "totals": totals.to_dict(),
        **{
            f"by_{g}": [{"key": k, **t.to_dict()} for k, t in group(rows, g)]
            for g in ("task", "model", "user")
        },
        "equivalents": equivalents(totals.co2e_g),
    }


CSV_FIELDS = (
    "key",
    "requests",
    "energy_j",
    "co2e_g",
    "prompt_tokens",
    "completion_tokens",
    "measured_share",
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
        f"{head:<{width}}  {'requests':>9}  {'energy_J':>14}  {'CO2e_g':>12}  {'measured':>8}",
    ]
    for key, t in rows:
        lines.append(
            f"{key!s:<{width}}  {t['requests']:>9}  {t['energy_j']:>14.3f}  "
            f"{t['co2e_g']:>12.6f}  {t['measured_share']:>8.0%}"
        )
    eq = report["equivalents"]
    lines.append(
        f"= {eq['smartphone_charges']:.3f} smartphone charges, "
        f"{eq['km_gasoline_car']:.4f} km by gasoline car ({EQUIVALENTS_SOURCE})"
    )
    return "\n".join(lines)
