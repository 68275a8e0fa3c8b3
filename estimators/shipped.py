"""The tables shipped with the package (carbon intensity, grid water, device embodied figures):
CSV files whose lines starting with ``#`` say where the figures come from."""

from __future__ import annotations

import csv
from importlib import resources


def shipped_rows(package: str, name: str) -> list[dict[str, str]]:
    """The rows of the shipped CSV table ``name`` in ``package``, its comment lines left out."""
    text = resources.files(package).joinpath(name).read_text("utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return list(csv.DictReader(lines))
