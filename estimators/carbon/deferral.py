"""How long a deferrable request waits for a lower-intensity window (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from estimators.carbon.base import Intensity


def deferral_s(
    now_g_per_kwh: float, now: datetime, forecast: Sequence[Intensity], max_wait_s: float
) -> float:
    """Seconds until the lowest-intensity forecast window that starts within ``max_wait_s``
    and is lower than now (the earliest of equals); 0 when none is lower. A window already
    begun counts as starting now."""
    best = (now_g_per_kwh, 0.0)
    for window in forecast:
        if window.at is None:
            continue
        start_s = max(0.0, (window.at - now).total_seconds())
        if start_s <= max_wait_s and (window.g_per_kwh, start_s) < best:
            best = (window.g_per_kwh, start_s)
    return best[1] if best[0] < now_g_per_kwh else 0.0
