"""config.yaml as pydantic models: every key optional, ``WATTPROXY_*`` env vars override, and every
problem is reported with its key path (``upstreams.0.url: ...``).

Env overrides nest with double underscores: ``WATTPROXY_LISTEN__PORT=9000``,
``WATTPROXY_LEDGER__URL=redis://...``; values are read as YAML scalars (numbers, booleans, lists).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.errors import ConfigError

ENV_PREFIX = "WATTPROXY_"
#: Env vars that are not config keys.
ENV_RESERVED = {"WATTPROXY_ADMIN_TOKEN", "WATTPROXY_CONFIG"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Model):
    cert_file: str
    key_file: str


class ListenConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls: TLSConfig | None = None
    #: a separate listener for /metrics (e.g. {host: 0.0.0.0, port: 9464}); null: on the main one
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str | None = None
    #: seconds to read a request's headers and body before 408 (slow-loris guard)
    read_timeout_s: float = Field(30.0, gt=0)
    #: seconds to let in-flight streams finish on SIGTERM
    shutdown_grace_s: float = Field(30.0, ge=0)


class TimeoutsConfig(_Model):
    connect_s: float = Field(5.0, gt=0)
    first_byte_s: float = Field(300.0, gt=0)
    idle_s: float = Field(120.0, gt=0)


Api = Literal["openai", "tgi", "tei", "ollama", "generic"]


class UpstreamConfig(_Model):
    name: str = "llm"
    url: str = "http://127.0.0.1:8000"
    prefix: str = "/"
    api: Api = "openai"
    devices: list[str] | None = None
    models: list[str] = Field(default_factory=lambda: ["*"])
    model_path: str | None = None
    tasks: dict[str, str] = Field(default_factory=dict)
    api_key_env: str | None = None
    ca_file: str | None = None
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    max_connections: int = Field(1000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
        return value.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value


class DeviceSelector(_Model):
    index: int | None = Field(None, ge=0)
    uuid: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one(self) -> DeviceSelector:
        if sum(x is not None for x in (self.index, self.uuid, self.path)) != 1:
            raise ValueError("set exactly one of index, uuid or path")
        return self


class MeterConfig(_Model):
    kind: Literal["auto", "nvml", "dcgm", "rapl", "simulated", "none"] = "auto"
    interval_ms: int = Field(100, ge=10, le=60_000)
    devices: dict[str, DeviceSelector] | None = None
    dcgm_url: str = "http://127.0.0.1:9400/metrics"
    rapl_root: str = "/sys/class/powercap"
    #: simulated meter only: idle watts of the simulated device
    simulated_idle_w: float = Field(60.0, ge=0)
    #: simulated meter only: relative standard deviation of its seeded power noise
    simulated_noise: float = Field(0.02, ge=0, le=0.5)


class AttributionConfig(_Model):
    idle: Literal["exclude", "include"] = "exclude"
    idle_watts: Literal["auto"] | float = "auto"
    weighting: Literal["work", "time"] = "work"

    @field_validator("idle_watts")
    @classmethod
    def _idle(cls, value: Any) -> Any:
        if isinstance(value, float) and value < 0:
            raise ValueError("must be 'auto' or a number of watts >= 0")
        return value


class CarbonConfig(_Model):
    zone: str = "WORLD"
    intensity_g_per_kwh: float | None = Field(None, ge=0)
    pue: float = Field(1.0, ge=1.0, le=5.0)
    provider: Literal["static", "electricitymaps", "uk-carbon-intensity", "watttime"] = "static"
    #: env var holding the provider's token (Electricity Maps auth-token; WattTime "user:pass")
    token_env: str | None = None
    url: str | None = None
    refresh_s: float = Field(300.0, gt=0)
    timeout_s: float = Field(5.0, gt=0)


class LedgerConfig(_Model):
    url: str = "sqlite:///wattproxy.db"
    batch_size: int = Field(256, ge=1)
    flush_interval_ms: int = Field(500, ge=1)
    retention_days: int = Field(90, ge=1)
    spool_path: str = "wattproxy-spool.jsonl"
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=1024)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("sqlite", "redis", "rediss"):
            raise ValueError(f"must be sqlite:///PATH, redis://... or rediss://..., got {value!r}")
        return value


class IdentityConfig(_Model):
    keys_file: str | None = None
    allow_header_identity: bool = False
    #: key requests by the client's X-Request-Id (behind a gateway that issues unique ids);
    #: false: the proxy makes its own, and keeps the client's as ``client_request_id``
    trust_request_id: bool = False


class Budget(_Model):
    grams_per_day: float | None = Field(None, ge=0)
    grams_per_month: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if self.grams_per_day is None and self.grams_per_month is None:
            raise ValueError("set grams_per_day or grams_per_month")
        return self


class BudgetsConfig(_Model):
    users: dict[str, Budget] = Field(default_factory=dict)
    teams: dict[str, Budget] = Field(default_factory=dict)
    default: Budget | None = None
    cache_s: float = Field(2.0, ge=0)
    #: seconds an admitted request's reservation lasts at most (a crashed replica's expires)
    reservation_ttl_s: float = Field(600.0, gt=0)


class LimitsConfig(_Model):
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)


class MetricsConfig(_Model):
    #: add a ``user`` label to the energy and CO2 counters (top users only, the rest ``_other``)
    per_user_labels: bool = False
    max_user_labels: int = Field(50, ge=1, le=10_000)


class LogConfig(_Model):
    access_log: bool = False
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Model):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    upstreams: list[UpstreamConfig] = Field(default_factory=lambda: [UpstreamConfig()])
    meter: MeterConfig = Field(default_factory=MeterConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)
    carbon: CarbonConfig = Field(default_factory=CarbonConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    admin_token_env: str = "WATTPROXY_ADMIN_TOKEN"
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names = [u.name for u in self.upstreams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"upstreams: names must be unique, repeated: {', '.join(dupes)}")
        if not self.upstreams:
            raise ValueError("upstreams: at least one upstream is needed")
        return self


def _env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path or path[0] not in Config.model_fields:
            continue
        node: Any = data
        for key in path[:-1]:
            child = node.get(key) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        try:
            node[path[-1]] = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            node[path[-1]] = raw
    return data


def _format_errors(err: ValidationError, origin: str) -> list[str]:
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{origin}: {path}: {msg}")
    return problems


def parse_config(
    data: Any, origin: str = "config", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate a parsed YAML document. Raises ``ConfigError`` listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{origin}: the top level must be a mapping of keys, not {type(data).__name__}"]
        )
    data = _env_overrides(dict(data), os.environ if environ is None else environ)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path`` (or only defaults and env when ``None``)."""
    if path is None:
        return parse_config({}, "defaults", environ)
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read: {e}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{p}: not valid YAML{where}: {problem}"]) from None
    return parse_config(data, str(p), environ)
