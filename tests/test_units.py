"""The one parser of counts written as text (headers, exporter labels, /proc names)."""

from __future__ import annotations

import pytest

from estimators.units import parse_count


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
