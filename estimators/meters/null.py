"""The meter used when nothing can be measured: no devices, so every request is estimated."""

from __future__ import annotations

import time

from estimators.meters.base import Meter, Reading


class NullMeter(Meter):
    kind = "none"

    def devices(self) -> list[str]:
        return []

    def read(self) -> Reading:
        return Reading(timestamp_s=time.monotonic(), energy_j={})
