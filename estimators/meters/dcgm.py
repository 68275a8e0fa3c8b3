"""NVIDIA GPUs through a dcgm-exporter's ``/metrics`` page, for hosts where DCGM owns the GPUs
(the Kubernetes GPU operator, MIG partitions, fleets already scraped by Prometheus).

Two series are used, selected by the ``gpu`` label (the NVML index) or the ``UUID`` label:
``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (counter, mJ since boot) when the exporter has it,
else ``DCGM_FI_DEV_POWER_USAGE`` (gauge, W) integrated by the trapezoid rule. The exporter
refreshes its values once per collect interval (``dcgm-exporter -c``, 30000 ms by default), so a
meter polling faster sees the same numbers repeated and energy arriving in steps: this is
detected and logged once, with the fix.

``read`` blocks on one HTTP GET (the sampler calls it in a thread); network and parse errors are
translated into ``MeterError`` here.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

from estimators.errors import MeterError, MeterUnavailable
from estimators.meters.base import (
    EnergyCounter,
    GpuSelector,
    Meter,
    PowerIntegrator,
    Reading,
    read_each,
)
from estimators.units import MJ_PER_J, parse_count

log = logging.getLogger("wattproxy.meter.dcgm")

ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"  # counter, mJ since boot
POWER_METRIC = "DCGM_FI_DEV_POWER_USAGE"  # gauge, W
DEFAULT_URL = "http://127.0.0.1:9400/metrics"
SCRAPE_TIMEOUT_S = 2.0  # one scrape; a slow exporter must not stall the sampler
DEFAULT_INTERVAL_S = 0.1
EXPORTER_DEFAULT_COLLECT_MS = 30_000
#: Identical values for longer than this many meter intervals mean the exporter is slower.
STALE_INTERVALS = 2.0

EnergySource = Literal["counter", "power"]


@dataclass(frozen=True, slots=True)
class Series:
    """One sample line of the page: its labels and value (in the metric's own unit)."""

    labels: Mapping[str, str]
    value: float


def parse_page(text: str) -> dict[str, list[Series]]:
    """The energy and power series of an exporter page, by metric name.

    Only the two metrics' lines are parsed: a page has dozens of others, and an odd line among
    them must not cost the energy reading.
    """
    wanted = (ENERGY_METRIC, POWER_METRIC)
    kept = [line for line in text.splitlines() if _mentions(line, wanted)]
    series: dict[str, list[Series]] = {name: [] for name in wanted}
    try:
        for family in text_string_to_metric_families("\n".join(kept) + "\n"):
            if family.name in series:
                series[family.name].extend(Series(s.labels, s.value) for s in family.samples)
    except ValueError as e:
        raise MeterError(f"dcgm: the exporter page does not parse: {e}") from e
    return series


def _mentions(line: str, names: Iterable[str]) -> bool:
    for name in names:
        if line.startswith((f"{name}{{", f"{name} ", f"# TYPE {name} ", f"# HELP {name} ")):
            return True
    return False


def select(series: list[Series], selector: GpuSelector) -> Series | None:
    """The series of one GPU: by ``gpu`` label for an index, by ``UUID`` label for a UUID.

    On MIG hosts the exporter repeats device-wide metrics once per GPU instance (with
    ``GPU_I_ID``); the copy without it is preferred, any copy carries the same device value.
    """
    key, wanted = ("gpu", str(selector)) if isinstance(selector, int) else ("UUID", selector)
    matches = [s for s in series if s.labels.get(key) == wanted]
    whole = [s for s in matches if "GPU_I_ID" not in s.labels]
    return next(iter(whole or matches), None)


@dataclass(slots=True)
class _Gpu:
    """One GPU's energy bookkeeping; the source is fixed at its first sighting."""

    selector: GpuSelector
    source: EnergySource | None = None
    counter: EnergyCounter = field(default_factory=EnergyCounter)
    integrator: PowerIntegrator = field(default_factory=PowerIntegrator)
    last_value: float | None = None
    changed_at_s: float | None = None


class DcgmMeter(Meter):
    """Cumulative energy of NVIDIA GPUs, scraped from dcgm-exporter.

    Args:
        url: the exporter's metrics URL (``meter.dcgm_url``).
        devices: device name -> ``gpu`` label (int) or ``UUID`` label (str); default every GPU
            on the page, named gpu0, gpu1, ... after its ``gpu`` label.
        interval_s: the sampler's interval, to detect an exporter that updates more slowly.
        timeout_s: per scrape.
        clock: monotonic clock in seconds.

    Raises:
        MeterError: the exporter cannot be scraped when the meter opens.
        MeterUnavailable: the page has neither the energy nor the power metric.
    """

    kind = "dcgm"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        devices: Mapping[str, GpuSelector] | None = None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = SCRAPE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        # The exporter is node-local: never route it through HTTP(S)_PROXY from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._warned_stale = False
        t_s = clock()
        page = self._scrape()
        selectors = dict(devices) if devices else _default_selectors(page)
        if not selectors:
            raise MeterUnavailable(
                f"dcgm: {url} has no {ENERGY_METRIC} or {POWER_METRIC} series; enable them in "
                "the exporter's counters CSV (both are in its default-counters.csv)"
            )
        self._gpus = {name: _Gpu(selector) for name, selector in selectors.items()}
        for name, gpu in self._gpus.items():
            try:
                self._sample(name, gpu, page, t_s)  # the baseline: energy counts from here
            except MeterError as e:
                log.warning("%s: %s", name, e)

    @classmethod
    def is_available(cls, url: str = DEFAULT_URL, timeout_s: float = SCRAPE_TIMEOUT_S) -> bool:
        """Whether the exporter answers with at least one GPU's energy or power."""
        try:
            return bool(cls(url, timeout_s=timeout_s).devices())
        except MeterError:
            return False

    def devices(self) -> list[str]:
        return list(self._gpus)

    def read(self) -> Reading:
        with self._lock:
            t_s = self._clock()
            page = self._scrape()
            gpus = self._gpus
            return read_each(
                "dcgm", t_s, gpus, lambda n: self._sample(n, gpus[n], page, t_s), unit="GPU"
            )

    def _scrape(self) -> dict[str, list[Series]]:
        request = urllib.request.Request(self._url, headers={"Accept": "text/plain"})
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                body: bytes = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise MeterError(f"dcgm: cannot scrape {self._url}: {e}") from e
        return parse_page(body.decode("utf-8", errors="replace"))

    def _sample(
        self, name: str, gpu: _Gpu, page: Mapping[str, list[Series]], t_s: float
    ) -> tuple[float, float | None]:
        energy = select(page[ENERGY_METRIC], gpu.selector)
        power = select(page[POWER_METRIC], gpu.selector)
        if gpu.source is None:
            if energy is None and power is None:
                raise MeterError(f"dcgm: no series for {_describe(gpu.selector)} on {self._url}")
            gpu.source = "counter" if energy is not None else "power"
            log.info("%s (%s): energy from %s", name, _describe(gpu.selector), gpu.source)
        power_w = power.value if power is not None else None
        if gpu.source == "counter":
            if energy is None:
                raise MeterError(f"dcgm: no {ENERGY_METRIC} for {_describe(gpu.selector)}")
            raw = energy.value
            resets = gpu.counter.resets
            energy_j = gpu.counter.update(raw / MJ_PER_J)
            if gpu.counter.resets != resets:
                log.warning("%s: the DCGM energy counter went back; counting on from it", name)
        else:
            if power_w is None:
                raise MeterError(f"dcgm: no {POWER_METRIC} for {_describe(gpu.selector)}")
            raw = power_w
            energy_j = gpu.integrator.update(t_s, power_w)
        self._watch_staleness(name, gpu, raw, t_s)
        return energy_j, power_w

    def _watch_staleness(self, name: str, gpu: _Gpu, raw: float, t_s: float) -> None:
        """Warn once when values stay identical over several meter intervals."""
        if gpu.last_value != raw or gpu.changed_at_s is None:
            gpu.last_value, gpu.changed_at_s = raw, t_s
            return
        unchanged_s = t_s - gpu.changed_at_s
        if not self._warned_stale and unchanged_s > STALE_INTERVALS * self._interval_s:
            self._warned_stale = True
            log.warning(
                "dcgm-exporter at %s repeated %s's value for %.1f s, more than %g meter "
                "intervals of %.0f ms: it updates more slowly than the meter (its collect "
                "interval, dcgm-exporter -c, defaults to %d ms), so energy arrives in steps and "
                "short requests are attributed coarsely; start it with -c %d",
                self._url,
                name,
                unchanged_s,
                STALE_INTERVALS,
                self._interval_s * 1000,
                EXPORTER_DEFAULT_COLLECT_MS,
                max(1, round(self._interval_s * 1000)),
            )


def _describe(selector: GpuSelector) -> str:
    return f'gpu="{selector}"' if isinstance(selector, int) else f'UUID="{selector}"'


def _default_selectors(page: Mapping[str, list[Series]]) -> dict[str, GpuSelector]:
    indexes = {
        parse_count(s.labels.get("gpu"))
        for name in (ENERGY_METRIC, POWER_METRIC)
        for s in page[name]
    }
    return {f"gpu{i}": i for i in sorted(i for i in indexes if i is not None)}
