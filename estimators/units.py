"""Unit conversions, done once where a reading enters or a figure leaves, and the one reader of
counts written as text (headers, exporter labels)."""

from __future__ import annotations

J_PER_KWH = 3_600_000.0
J_PER_WH = 3_600.0
#: NVML and dcgm-exporter count energy in millijoules, RAPL's powercap in microjoules.
MJ_PER_J = 1_000.0
UJ_PER_J = 1_000_000.0
#: NVML reports power in milliwatts.
MW_PER_W = 1_000.0


def kwh_to_j(energy_kwh: float) -> float:
    return energy_kwh * J_PER_KWH


def g_per_j(intensity_g_per_kwh: float, pue: float = 1.0) -> float:
    """Grams CO2e per joule drawn at the accelerator; PUE scales it to the facility first."""
    return intensity_g_per_kwh * pue / J_PER_KWH


def co2e_g(energy_j: float, intensity_g_per_kwh: float, pue: float = 1.0) -> float:
    """Grams CO2e for energy drawn at the accelerator, as the proxy charges it (``g_per_j``)."""
    return energy_j * g_per_j(intensity_g_per_kwh, pue)


def parse_count(text: str | None) -> int | None:
    """A count written in ASCII digits (``[0-9]+``), else None.

    Not ``isdigit()`` then ``int()``: ``'²'.isdigit()`` is true and ``int('²')`` raises, while
    ``int`` reads other scripts' digits (``'١٢'`` is 12) that no header or label means.
    """
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text)
