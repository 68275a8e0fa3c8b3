"""The record of one proxied request: the SPEC's shape plus the fields operators need to debug."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

#: The SPEC's record fields, in its order; ``to_dict`` emits these first.
SPEC_FIELDS = (
    "request_id",
    "user",
    "team",
    "upstream",
    "model",
    "task",
    "status",
    "started_at",
    "ended_at",
    "prompt_tokens",
    "completion_tokens",
    "energy_j",
    "co2e_g",
    "source",
    "final",
)


def utc_iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class RequestRecord:
    """One request's figures. ``source`` is ``measured`` or ``estimated``; ``final`` turns true
    once the meter has sampled past the request's end."""

    request_id: str
    user: str
    team: str | None
    upstream: str
    model: str | None
    task: str
    status: int
    started_at: str
    ended_at: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    energy_j: float = 0.0
    co2e_g: float = 0.0
    source: str = "estimated"
    final: bool = False
    end_user: str | None = None
    key_id: str | None = None
    tokens_source: str = "none"
    outcome: str = "ok"
    duration_s: float | None = None
    ttfb_s: float | None = None
    basis: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["energy_j"] = round(self.energy_j, 6)
        d["co2e_g"] = round(self.co2e_g, 9)
        ordered = {k: d.pop(k) for k in SPEC_FIELDS}
        ordered.update(d)
        ordered.update(extra)
        return ordered

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "extra"}
        extra = {k: v for k, v in d.items() if k not in cls.__dataclass_fields__}
        return cls(**known, extra=extra)

    @property
    def day(self) -> str:
        return (self.ended_at or self.started_at)[:10]
