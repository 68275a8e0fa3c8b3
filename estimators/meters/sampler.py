"""The background loop that reads the meter every interval, off the event loop (in a thread),
and hands each reading to a callback on the loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from estimators.errors import MeterError
from estimators.meters.base import Meter, Reading

log = logging.getLogger("wattproxy.sampler")


class Sampler:
    """Reads ``meter`` every ``interval_s`` and calls ``on_reading`` with the result.

    A read that raises becomes a ``Reading`` whose ``errors`` name every device, so consumers
    see the outage; the loop keeps going and recovers when the meter does.
    """

    def __init__(
        self,
        meter: Meter,
        interval_s: float,
        on_reading: Callable[[Reading], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.meter = meter
        self.interval_s = interval_s
        self.on_reading = on_reading
        self.clock = clock
        self.reads = 0
        self.failures = 0

    async def read_once(self) -> Reading:
        try:
            reading = await asyncio.to_thread(self.meter.read)
        except MeterError as e:
            self.failures += 1
            reading = Reading(
                timestamp_s=self.clock(),
                energy_j={},
                errors=dict.fromkeys(self.meter.devices(), str(e)),
            )
        except Exception as e:  # a meter bug must not stop metering for good
            self.failures += 1
            log.exception("meter %s raised", self.meter.kind)
            reading = Reading(
                timestamp_s=self.clock(),
                energy_j={},
                errors=dict.fromkeys(self.meter.devices(), f"{type(e).__name__}: {e}"),
            )
        self.reads += 1
        self.on_reading(reading)
        return reading

    async def run(self) -> None:
        next_tick = self.clock()
        while True:
            await self.read_once()
            next_tick += self.interval_s
            delay = next_tick - self.clock()
            if delay < 0:  # fell behind (slow meter): skip ticks rather than burst
                next_tick = self.clock()
                delay = 0.0
            await asyncio.sleep(delay)
