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
from typing import TYPE_CHECKING

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

    def needs_model(self, path: str) -> bool:
        """Whether routing ``path`` depends on the body's model (several candidates or a filter)."""
        candidates = self.candidates(path)
        return len(candidates) > 1 or any(u.models != ["*"] for u in candidates)


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
