"""A report from ledger aggregates: totals, groups, equivalents, for one user or everyone. Pure."""

from __future__ import annotations

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
    embodied_co2e_g: float = 0.0
    embodied_requests: int = 0
    water_l: float = 0.0
    water_requests: int = 0

    def add(self, row: AggregateRow) -> None:
        self.requests += row.requests
        self.energy_j += row.energy_j
        self.co2e_g += row.co2e_g
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.measured_energy_j += row.measured_energy_j
        self.embodied_co2e_g += row.embodied_co2e_g
        self.embodied_requests += row.embodied_requests
        self.water_l += row.water_l
        self.water_requests += row.water_requests

    def to_dict(self) -> dict[str, Any]:
        share = self.measured_energy_j / self.energy_j if self.energy_j > 0 else 0.0
        return {
            "requests": self.requests,
            "energy_j": round(self.energy_j, 6),
            "co2e_g": round(self.co2e_g, 9),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "measured_share": round(min(1.0, share), 6),
            # null, not 0, where no request had a figure (none configured)
            "embodied_co2e_g": round(self.embodied_co2e_g, 9) if self.embodied_requests else None,
            "water_l": round(self.water_l, 12) if self.water_requests else None,
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
