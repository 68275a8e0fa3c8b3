"""Which upstream answers a request: the longest matching path prefix, then the body's ``model``.

Pure. ``models`` entries are exact names or shell-style globs (``llama-*``, ``*``). Prefixes
match whole path segments: ``/generate`` matches ``/generate`` and ``/generate/x``, never
``/generate_stream``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from estimators.units import J_PER_KWH

if TYPE_CHECKING:  # config.py checks routing at load time: no import cycle at run time
    from proxy.config import UpstreamConfig

_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class Route:
    upstream: UpstreamConfig
    prefix_len: int


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    p = prefix.rstrip("/")
    return path == p or path.startswith(p + "/")


def _serves(upstream: UpstreamConfig, model: str) -> bool:
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in upstream.models)


class Router:
    def __init__(self, upstreams: Sequence[UpstreamConfig]) -> None:
        # longest prefix first; ties keep config order
        self._upstreams = sorted(
            upstreams, key=lambda u: -len(u.prefix.rstrip("/") if u.prefix != "/" else "")
        )

    def candidates(self, path: str) -> list[UpstreamConfig]:
        """Upstreams whose prefix matches, the longest prefix first."""
        matches = [u for u in self._upstreams if _prefix_matches(u.prefix, path)]
        if not matches:
            return []
        longest = len(matches[0].prefix.rstrip("/"))
        return [u for u in matches if len(u.prefix.rstrip("/")) == longest]

    def route(self, path: str, model: str | None) -> UpstreamConfig | None:
        """The upstream for ``path`` and ``model``; ``None`` when nothing serves them."""
        candidates = self.candidates(path)
        if not candidates:
            return None
        if model is None:
            wildcard = [u for u in candidates if "*" in u.models]
            return (wildcard or candidates)[0]
        exact = [u for u in candidates if model in u.models]
        if exact:
            return exact[0]
        for upstream in candidates:
            if _serves(upstream, model):
                return upstream
        return None

    def serving(self, path: str, model: str | None) -> list[UpstreamConfig]:
        """Every upstream that could answer ``path`` and ``model``, in ``route``'s order of
        preference (its choice first), for a routing policy to choose among."""
        candidates = self.candidates(path)
        if not candidates:
            return []
        if model is None:
            wildcard = [u for u in candidates if "*" in u.models]
            return wildcard or candidates[:1]
        exact = [u for u in candidates if model in u.models]
        return exact + [u for u in candidates if model not in u.models and _serves(u, model)]

    def needs_model(self, path: str) -> bool:
        """Whether routing ``path`` depends on the body's model (several candidates or a filter)."""
        candidates = self.candidates(path)
        return len(candidates) > 1 or any(u.models != ["*"] for u in candidates)


Policy = Literal["first", "least_carbon", "least_energy"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """An upstream that serves the request, with what a policy weighs."""

    name: str
    #: the request's expected energy on this upstream (calibration, else estimate)
    expected_j: float
    #: its zone's grid intensity now
    g_per_kwh: float
    pue: float
    in_flight: int
    #: its recent mean time to response headers; None before its first answer
    first_byte_s: float | None = None

    @property
    def facility_j(self) -> float:
        return self.expected_j * self.pue

    @property
    def expected_g(self) -> float:
        return self.facility_j * self.g_per_kwh / J_PER_KWH


@dataclass(frozen=True, slots=True)
class RouteLimits:
    """Past these an upstream is skipped while another is within them (None: no limit)."""

    max_in_flight: int | None = None
    max_first_byte_s: float | None = None


def _over(c: Candidate, limits: RouteLimits) -> str | None:
    if limits.max_in_flight is not None and c.in_flight >= limits.max_in_flight:
        return "busy"
    if (
        limits.max_first_byte_s is not None
        and c.first_byte_s is not None
        and c.first_byte_s > limits.max_first_byte_s
    ):
        return "slow"
    return None


def choose(candidates: Sequence[Candidate], policy: Policy, limits: RouteLimits) -> tuple[int, str]:
    """The index of the candidate to route to, and why.

    Candidates come in the router's order (the first is what ``first`` routing picks). One
    past a limit is skipped while another is within them; the reason then names each skipped
    one (``skipped_busy:a``, ``skipped_slow:b``, comma-joined). When every one is past a limit
    none is skipped (``all_busy``). Otherwise the reason is ``only`` (one candidate) or the
    policy. ``least_carbon`` takes the lowest expected grams (J x PUE x intensity),
    ``least_energy`` the lowest facility joules (J x PUE); ties keep the router's order.
    """
    if not candidates:
        raise ValueError("choose: no candidates")
    if len(candidates) == 1:
        return 0, "only"
    over = [_over(c, limits) for c in candidates]
    eligible = [i for i, o in enumerate(over) if o is None]
    skipped = [f"skipped_{o}:{c.name}" for c, o in zip(candidates, over, strict=True) if o]
    if not eligible:
        eligible, skipped = list(range(len(candidates))), ["all_busy"]
    if policy == "least_carbon":
        chosen = min(eligible, key=lambda i: (candidates[i].expected_g, i))
    elif policy == "least_energy":
        chosen = min(eligible, key=lambda i: (candidates[i].facility_j, i))
    else:
        chosen = eligible[0]
    return chosen, ",".join(skipped) if skipped else policy


def _same_prefix(upstream: UpstreamConfig) -> str:
    return upstream.prefix.rstrip("/") or "/"


def _literal_head(pattern: str) -> str:
    """What every name ``pattern`` matches starts with: the text before its first glob."""
    m = _GLOB.search(pattern)
    return pattern if m is None else pattern[: m.start()]


def _covers(earlier: str, pattern: str) -> bool:
    """Whether glob ``earlier`` matches every name glob ``pattern`` matches. Sufficient, not
    complete (no false alarm): the same pattern, ``*``, or ``head*`` where every name of
    ``pattern`` starts with ``head``."""
    if earlier in (pattern, "*"):
        return True
    head = earlier[:-1]
    return (
        earlier.endswith("*")
        and _GLOB.search(head) is None
        and _literal_head(pattern).startswith(head)
    )


def shadowed_upstreams(upstreams: Sequence[UpstreamConfig]) -> list[str]:
    """Model entries that can never route to their upstream because an earlier upstream with
    the same prefix is always chosen first (``Router.route``: an exact name anywhere, then the
    first glob in config order), as ``upstreams.N[.models.I]: ...`` problems naming both."""
    problems: list[str] = []
    for n, upstream in enumerate(upstreams):
        earlier = [
            (i, u) for i, u in enumerate(upstreams[:n]) if _same_prefix(u) == _same_prefix(upstream)
        ]
        if not earlier:
            continue
        dead: list[tuple[int, str, list[tuple[int, UpstreamConfig]]]] = []
        for k, entry in enumerate(upstream.models):
            if _GLOB.search(entry) is None:  # an exact name: the first to list it wins
                by = [(i, u) for i, u in earlier if entry in u.models]
            else:  # a glob: the first upstream with a glob matching the name wins
                by = [(i, u) for i, u in earlier if any(_covers(p, entry) for p in u.models)]
            if by:
                dead.append((k, entry, by[:1]))
        if not dead:
            continue
        where = f"same prefix {upstream.prefix!r}, listed earlier"
        if len(dead) == len(upstream.models):
            firsts = dict.fromkeys((i, u.name) for _, _, by in dead for i, u in by)
            names = ", ".join(f"{name!r} (upstreams.{i})" for i, name in firsts)
            problems.append(
                f"upstreams.{n}: upstream {upstream.name!r} can never be chosen: every model it "
                f"lists goes to upstream {names} ({where}); give it another prefix or models "
                "no earlier upstream takes"
            )
            continue
        for k, entry, [(i, first)] in dead:
            problems.append(
                f"upstreams.{n}.models.{k}: model {entry!r} never reaches upstream "
                f"{upstream.name!r}: upstream {first.name!r} (upstreams.{i}, {where}) is "
                "chosen first for it"
            )
    return problems
