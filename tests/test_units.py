"""Units: the one parser of counts written as text (headers, exporter labels, /proc names), the
one carbon conversion, and each unit constant defined once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from estimators.carbon import CarbonClock, StaticIntensity
from estimators.units import J_PER_KWH, co2e_g, g_per_j, parse_count


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("12", 12),
        ("0", 0),
        ("007", 7),
        # str.isdigit() says yes to these, and int() refuses the first or reads the second
        ("\u00b2", None),  # superscript two
        ("1\u00b2", None),
        ("\u0661\u0662", None),  # Arabic-Indic twelve
        ("\uff11\uff12", None),  # fullwidth twelve
        ("", None),
        (None, None),
        (" 12", None),
        ("-1", None),
        ("+1", None),
        ("1_000", None),
        ("1.5", None),
    ],
)
def test_only_ascii_digits_are_a_count(text: str | None, count: int | None) -> None:
    assert parse_count(text) == count


def test_co2e_is_energy_times_the_clocks_g_per_j() -> None:
    """The estimate CLI's grams and the proxy's (``CarbonClock.g_per_j``) use one conversion."""
    clock = CarbonClock(StaticIntensity(400.0), "DE", pue=1.25)
    intensity_g_per_kwh = clock.intensity.g_per_kwh  # the table's, until the first refresh
    assert clock.g_per_j() == g_per_j(intensity_g_per_kwh, 1.25)
    assert co2e_g(7200.0, intensity_g_per_kwh, 1.25) == 7200.0 * clock.g_per_j()
    assert co2e_g(J_PER_KWH, 400.0, 1.25) == pytest.approx(500.0)


ROOT = Path(__file__).resolve().parent.parent
#: A unit conversion: joules, watt-hours, watts, seconds and their prefixes, per one another.
UNIT = r"(U|M|K)?(J|WH|W|S)"
UNIT_CONVERSION = re.compile(rf"{UNIT}_PER_{UNIT}")
#: A constant with a unit in its name (seconds, joules, watts, bytes, grams).
WITH_UNIT = re.compile(r"[A-Z0-9_]+_(S|MS|J|W|BYTES|G)")


def _constants() -> dict[str, list[tuple[str, str]]]:
    """Module-level UPPER_CASE names of the product code -> (module, value as written)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for folder in ("proxy", "estimators", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.parse(path.read_text("utf-8"), str(path)).body:
                if isinstance(node, ast.Assign):
                    targets, value = node.targets, node.value
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    targets, value = [node.target], node.value
                else:
                    continue
                for target in targets:
                    if isinstance(target, ast.Name) and target.id.isupper():
                        where = str(path.relative_to(ROOT))
                        found.setdefault(target.id, []).append((where, ast.unparse(value)))
    return found


def test_unit_conversions_are_defined_once_in_units() -> None:
    misplaced = [
        f"{name} in {where}"
        for name, places in _constants().items()
        if UNIT_CONVERSION.fullmatch(name)
        for where, _ in places
        if where != "estimators/units.py"
    ]
    assert misplaced == []


def test_no_name_with_a_unit_has_two_values() -> None:
    """One name, one value: ``RETRY_BASE_S`` was 0.05 s in one module and 0.2 s in another."""
    twice = {
        name: places
        for name, places in _constants().items()
        if WITH_UNIT.fullmatch(name) and len({value for _, value in places}) > 1
    }
    assert twice == {}
