"""Which upstream answers a request: the longest matching path prefix, then the body's ``model``.

Pure. ``models`` entries are exact names or shell-style globs (``llama-*``, ``*``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config import UpstreamConfig


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
