"""The I/O shell of carbon- and energy-aware routing (``routing.policy``): one carbon clock per
distinct upstream zone, each upstream's requests in flight and recent time to response headers,
and the candidates' expected joules; the choice itself is ``proxy.routing.choose`` (pure).

Idle under the default (``policy: first`` and no limit): ``Router.route`` decides as it always
did, and nothing here runs on the request path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from estimators.carbon import CarbonClock, CarbonConfig, grid_water
from estimators.embodied import water_l_per_j
from estimators.estimator import Estimator, RequestShape
from proxy.accounting import UNSET, Unset
from proxy.config import Config, RoutingConfig, UpstreamConfig
from proxy.routing import Candidate, RouteLimits, choose
from proxy.tasks import task_for
from proxy.usage.base import RequestPlan
from proxy.usage.resolve import prompt_estimate

ZoneKey = tuple[str, float | None, float]


def upstream_carbon(carbon: CarbonConfig, upstream: UpstreamConfig) -> CarbonConfig:
    """The ``carbon:`` section as ``upstream`` sees it: its own zone, fixed intensity and PUE
    where it names them. A zone of its own drops the section's fixed intensity (that figure
    is the section's zone's)."""
    own = upstream.carbon
    if own is None:
        return carbon
    intensity = own.intensity_g_per_kwh
    if intensity is None and own.zone is None:
        intensity = carbon.intensity_g_per_kwh
    return carbon.model_copy(
        update={
            "zone": own.zone or carbon.zone,
            "intensity_g_per_kwh": intensity,
            "pue": own.pue if own.pue is not None else carbon.pue,
        }
    )


def _key(carbon: CarbonConfig) -> ZoneKey:
    return carbon.zone.upper(), carbon.intensity_g_per_kwh, carbon.pue


def is_active(routing: RoutingConfig) -> bool:
    """Whether routing weighs anything (else ``Router.route`` alone decides)."""
    return (
        routing.policy != "first"
        or routing.max_in_flight is not None
        or routing.max_first_byte_s is not None
    )


class RouteState:
    """What routing reads about upstreams now.

    Args:
        base: the ``carbon:`` section's clock (the one accounting uses).
        base_cfg: that section.
        make_clock: builds (does not start) a clock for another zone's settings.
    """

    def __init__(
        self,
        base: CarbonClock,
        base_cfg: CarbonConfig,
        make_clock: Callable[[CarbonConfig], CarbonClock],
    ) -> None:
        self._base_cfg = base_cfg
        self._make_clock = make_clock
        self._clocks: dict[ZoneKey, CarbonClock] = {_key(base_cfg): base}
        self.in_flight: dict[str, int] = {}
        self._first_byte_s: dict[str, deque[float]] = {}

    def ensure_clocks(self, upstreams: Iterable[UpstreamConfig]) -> list[CarbonClock]:
        """Clocks for the zones ``upstreams`` name that have none yet: returned, to be run in
        the background (at startup, and when a reload names a new zone)."""
        new = []
        for upstream in upstreams:
            carbon = upstream_carbon(self._base_cfg, upstream)
            key = _key(carbon)
            if key not in self._clocks:
                self._clocks[key] = clock = self._make_clock(carbon)
                new.append(clock)
        return new

    @property
    def base_cfg(self) -> CarbonConfig:
        """The ``carbon:`` section the upstreams' own settings override."""
        return self._base_cfg

    def clocks(self) -> list[CarbonClock]:
        """Every clock, the ``carbon:`` section's first."""
        return list(self._clocks.values())

    def extra_clocks(self) -> list[CarbonClock]:
        """The clocks other than the ``carbon:`` section's."""
        return [c for k, c in self._clocks.items() if k != _key(self._base_cfg)]

    def clock(self, upstream: UpstreamConfig) -> CarbonClock:
        key = _key(upstream_carbon(self._base_cfg, upstream))
        clock = self._clocks.get(key)
        if clock is None:  # a reload named it and its clock is not made yet: make it now
            [clock] = self.ensure_clocks([upstream])
        return clock

    def begin(self, name: str) -> None:
        self.in_flight[name] = self.in_flight.get(name, 0) + 1

    def end(self, name: str) -> None:
        left = self.in_flight.get(name, 0) - 1
        if left > 0:
            self.in_flight[name] = left
        else:
            self.in_flight.pop(name, None)

    def first_byte(self, name: str, seconds: float, window: int) -> None:
        """An answer's time to response headers, kept among the last ``window``."""
        recent = self._first_byte_s.get(name)
        if recent is None or recent.maxlen != window:
            recent = self._first_byte_s[name] = deque(recent or (), maxlen=window)
        recent.append(seconds)

    def mean_first_byte_s(self, name: str) -> float | None:
        recent = self._first_byte_s.get(name)
        return sum(recent) / len(recent) if recent else None

    def decide(
        self,
        cfg: Config,
        serving: list[UpstreamConfig],
        estimator: Estimator,
        plan: RequestPlan,
        data: Any,
        path: str,
        method: str,
        model_tasks: dict[str, str] | Any,
    ) -> tuple[UpstreamConfig, str]:
        """The upstream among ``serving`` (the router's order) for this request, and why."""
        prompt_tokens = prompt_estimate(plan, data) if len(serving) > 1 else 0
        candidates = []
        for upstream in serving:
            if len(serving) > 1:
                task = task_for(
                    path,
                    upstream.tasks,
                    upstream.api,
                    model_task=model_tasks.get(upstream.name),
                    method=method,
                )
                shape = RequestShape(
                    upstream.name,
                    plan.model,
                    task,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=plan.max_tokens,
                    images=plan.images,
                )
                expected_j = estimator.estimate(shape).energy_j
            else:
                expected_j = 0.0
            clock = self.clock(upstream)
            candidates.append(
                Candidate(
                    upstream.name,
                    expected_j,
                    clock.intensity.g_per_kwh,
                    clock.pue,
                    self.in_flight.get(upstream.name, 0),
                    self.mean_first_byte_s(upstream.name),
                )
            )
        r = cfg.routing
        index, reason = choose(
            candidates, r.policy, RouteLimits(r.max_in_flight, r.max_first_byte_s)
        )
        return serving[index], reason


class UpstreamGrids:
    """Grams CO2e per joule for devices and upstreams whose upstream names its own ``carbon``
    (zone, fixed intensity or PUE), so their records are charged at their own grid, not the
    ``carbon:`` section's. A device belongs to the first upstream that lists it in
    ``devices`` with a ``carbon`` of its own; others (and ``devices: null``) use the section.
    Follows the live config: a reload that moves an upstream moves its grams."""

    def __init__(self, routes: RouteState, upstreams: Callable[[], Sequence[UpstreamConfig]]):
        self._routes = routes
        self._upstreams = upstreams

    def device_g_per_j(self, device: str) -> float | None:
        for upstream in self._upstreams():
            if upstream.carbon is not None and upstream.devices and device in upstream.devices:
                return self._routes.clock(upstream).g_per_j()
        return None

    def upstream_g_per_j(self, name: str) -> float | None:
        for upstream in self._upstreams():
            if upstream.name == name:
                if upstream.carbon is None:
                    return None
                return self._routes.clock(upstream).g_per_j()
        return None

    def upstream_water_l_per_j(self, name: str) -> float | Unset | None:
        """Litres per joule where ``name`` draws its power, when its own ``carbon`` section
        moves it to another zone or PUE (``UNSET`` otherwise: the section's figure applies).
        With ``carbon.grid_water_from_table`` the grid's figure is its own zone's row (None
        when the table lacks it); a figure set by hand in ``carbon:`` applies to every zone."""
        base = self._routes.base_cfg
        for upstream in self._upstreams():
            if upstream.name != name or upstream.carbon is None:
                continue
            own = upstream_carbon(base, upstream)
            grid_l = base.grid_water_l_per_kwh
            if base.grid_water_from_table and own.zone.upper() != base.zone.upper():
                row = grid_water(own.zone)
                grid_l = None if row is None else row.l_per_kwh
            return water_l_per_j(base.wue_l_per_kwh, grid_l, own.pue)
        return UNSET
