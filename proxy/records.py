"""The record of one proxied request: the SPEC's shape plus the fields operators need to debug."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

try:  # orjson is optional: it encodes a record about ten times faster
    import orjson

    #: Types orjson would encode where ``json.dumps`` refuses them: left to the fallback.
    _ORJSON_OPTS = (
        orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )

    def dumps_doc(doc: dict[str, Any]) -> str:
        """``json.dumps(doc)`` (same values, compact): orjson, or ``json`` for what orjson
        would write otherwise (NaN and infinities, which orjson writes as null) or refuses."""
        for v in doc.values():
            if type(v) is float and not math.isfinite(v):
                return json.dumps(doc)
        try:
            return orjson.dumps(doc, option=_ORJSON_OPTS).decode()
        except TypeError:
            return json.dumps(doc)

except ImportError:  # pragma: no cover - exercised only without the extra

    def dumps_doc(doc: dict[str, Any]) -> str:
        return json.dumps(doc)


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


class _UTCNowISO:
    """``utc_iso(utcnow())`` at a fraction of its cost (twice per request): the text of the
    current second is formatted once, and only the milliseconds per call."""

    __slots__ = ("_second",)

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def __call__(self) -> str:
        s, us = divmod(time.time_ns() // 1000, 1_000_000)
        second = self._second
        if second[0] != s:
            second = self._second = (s, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)))
        return f"{second[1]}.{us // 1000:03d}Z"


utc_now_iso = _UTCNowISO()


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
    #: embodied grams CO2e (device manufacturing, by its share of device time); ``None`` when
    #: no device it ran on has embodied figures
    embodied_co2e_g: float | None = None
    #: litres of water (on-site WUE and the grid's); ``None`` when water is not configured
    water_l: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The SPEC's fields first, then the others, then ``extra`` (copied deeply, as
        ``dataclasses.asdict`` would; a field loop costs a twentieth of ``asdict``)."""
        d = dict(zip(SPEC_FIELDS, _spec_values(self), strict=True))
        d["energy_j"] = round(self.energy_j, 6)
        d["co2e_g"] = round(self.co2e_g, 9)
        d.update(zip(_OTHER_FIELDS, _other_values(self), strict=True))
        for k, v in self.extra.items():
            d[k] = v if type(v) in _SCALARS else copy.deepcopy(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "extra"}
        extra = {k: v for k, v in d.items() if k not in cls.__dataclass_fields__}
        return cls(**known, extra=extra)

    @property
    def day(self) -> str:
        return (self.ended_at or self.started_at)[:10]


#: Record fields after the SPEC's, in declaration order (``extra`` is merged in last).
_OTHER_FIELDS = tuple(
    f.name for f in fields(RequestRecord) if f.name not in SPEC_FIELDS and f.name != "extra"
)
_spec_values = attrgetter(*SPEC_FIELDS)
_other_values = attrgetter(*_OTHER_FIELDS)
#: Values ``to_dict`` passes through as they are (``asdict`` would return them unchanged too).
_SCALARS = frozenset((str, int, float, bool, type(None)))
