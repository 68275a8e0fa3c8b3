"""config.yaml as pydantic models: every key optional, ``WATTPROXY_*`` env vars override, and every
problem is reported with its key path (``upstreams.0.url: ...``).

Env overrides nest with double underscores: ``WATTPROXY_LISTEN__PORT=9000``,
``WATTPROXY_LEDGER__URL=redis://...``; values are read as YAML scalars (numbers, booleans, lists).
An override that names no key is a problem like any other (``_env_key_path`` has the rule).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from estimators.carbon import CarbonConfig, grid_water, grid_water_problem, zone_findings
from estimators.meters import MeterConfig
from estimators.section import Section
from proxy.errors import ConfigError
from proxy.routing import shadowed_upstreams

ENV_PREFIX = "WATTPROXY_"
#: Env vars that are not config keys.
ENV_RESERVED = {"WATTPROXY_ADMIN_TOKEN", "WATTPROXY_CONFIG"}


class TLSConfig(Section):
    cert_file: str
    key_file: str


def parse_workers(value: Any) -> int | str:
    """``listen.workers`` (or ``--workers``): a count >= 1, or ``auto``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    count = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        count = int(value)
    if count is None or count < 1:
        raise ValueError(f"must be a count >= 1, or auto (got {value!r:.40})")
    return count


class ListenConfig(Section):
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
    #: worker processes accepting on the port (SO_REUSEPORT) beside one accounting process;
    #: ``auto``: one per core this process may use. 1: a single process does everything.
    workers: int | Literal["auto"] = 1
    #: with workers: a worker's events waiting for the accounting process past this many bytes
    #: (it fell behind) make the worker answer new requests 503 until they are through
    max_event_backlog_bytes: int = Field(64 * 1024 * 1024, ge=64 * 1024)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> int | str:
        return parse_workers(v)


class TimeoutsConfig(Section):
    connect_s: float = Field(5.0, gt=0)
    first_byte_s: float = Field(300.0, gt=0)
    idle_s: float = Field(120.0, gt=0)


Api = Literal["openai", "tgi", "tei", "ollama", "generic"]


class UpstreamCarbonConfig(Section):
    """An upstream's own grid zone, fixed intensity and PUE (for carbon-aware routing); an
    unset key takes the ``carbon:`` section's value."""

    zone: str | None = None
    intensity_g_per_kwh: float | None = Field(None, ge=0)
    pue: float | None = Field(None, ge=1.0, le=5.0)


class UpstreamConfig(Section):
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
    #: this upstream's zone, intensity and PUE when routing.policy weighs carbon
    carbon: UpstreamCarbonConfig | None = None

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


class AttributionConfig(Section):
    idle: Literal["exclude", "include"] = "exclude"
    idle_watts: Literal["auto"] | float = "auto"
    weighting: Literal["work", "time"] = "work"

    @field_validator("idle_watts")
    @classmethod
    def _idle(cls, value: Any) -> Any:
        if isinstance(value, float) and value < 0:
            raise ValueError("must be 'auto' or a number of watts >= 0")
        return value


class LedgerConfig(Section):
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


class IdentityConfig(Section):
    keys_file: str | None = None
    allow_header_identity: bool = False
    #: key requests by the client's X-Request-Id (behind a gateway that issues unique ids);
    #: false: the proxy makes its own, and keeps the client's as ``client_request_id``
    trust_request_id: bool = False


class Budget(Section):
    grams_per_day: float | None = Field(None, ge=0)
    grams_per_month: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if self.grams_per_day is None and self.grams_per_month is None:
            raise ValueError("set grams_per_day or grams_per_month")
        return self


class BudgetsConfig(Section):
    users: dict[str, Budget] = Field(default_factory=dict)
    teams: dict[str, Budget] = Field(default_factory=dict)
    default: Budget | None = None
    cache_s: float = Field(2.0, ge=0)
    #: seconds an admitted request's reservation lasts at most (a crashed replica's expires)
    reservation_ttl_s: float = Field(600.0, gt=0)
    #: seconds a budget's ledger read or Redis reservation may take on the request path; past
    #: it the request is admitted on this process's own figures (budgets fail open)
    ledger_timeout_s: float = Field(0.5, gt=0)


class LimitsConfig(Section):
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)


class MetricsConfig(Section):
    #: add a ``user`` label to the energy and CO2 counters (top users only, the rest ``_other``)
    per_user_labels: bool = False
    max_user_labels: int = Field(50, ge=1, le=10_000)


class HealthConfig(Section):
    #: /readyz with some upstreams down: ``any`` (ready while at least one answers: a load
    #: balancer in front of this node keeps sending what it can serve) or ``all``
    ready_when: Literal["any", "all"] = "any"


class ResponseConfig(Section):
    #: add the request's energy (energy_j, co2e_g, source, final: false) to the usage object of
    #: every answer whose client asked for usage; per request: ``X-Wattproxy-Energy: include``
    energy_in_usage: bool = False


class RoutingConfig(Section):
    """Which of several upstreams serving a request's model answers it (``routing.choose``)."""

    policy: Literal["first", "least_carbon", "least_energy"] = "first"
    #: an upstream with this many requests in flight is skipped while another is not
    max_in_flight: int | None = Field(None, ge=1)
    #: an upstream whose recent mean time to response headers is past this is skipped
    max_first_byte_s: float | None = Field(None, gt=0)
    #: how many recent answers that mean is over
    first_byte_window: int = Field(20, ge=1)
    #: longest a request with ``X-Wattproxy-Deferrable: <seconds>`` waits for a forecast
    #: lower-intensity window (0: off, the header is ignored)
    max_deferral_s: float = Field(0.0, ge=0)


class LogConfig(Section):
    access_log: bool = False
    level: Literal["debug", "info", "warning", "error"] = "info"


class TracingConfig(Section):
    """OpenTelemetry spans (``proxy.tracing``); needs the ``otel`` extra."""

    enabled: bool = False
    #: OTLP/HTTP protobuf traces endpoint (a collector's, or any OTLP receiver's)
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "wattproxy"
    #: share of new traces kept; a client's sampled flag is followed (parent-based)
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    #: seconds one export may take
    timeout_s: float = Field(10.0, gt=0)
    #: spans waiting for export at most; past it new ones are dropped
    max_queue_size: int = Field(2048, ge=1)
    #: milliseconds between exports of a batch
    export_interval_ms: int = Field(1000, ge=1)
    max_export_batch_size: int = Field(512, ge=1)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value


class Config(Section):
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
    health: HealthConfig = Field(default_factory=HealthConfig)
    response: ResponseConfig = Field(default_factory=ResponseConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names = [u.name for u in self.upstreams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"upstreams: names must be unique, repeated: {', '.join(dupes)}")
        if not self.upstreams:
            raise ValueError("upstreams: at least one upstream is needed")
        return self


def _field_kind(annotation: Any) -> tuple[str, Any]:
    """What an env override may name below a field: ``("model", M)``, ``("dict", value
    annotation)`` (free keys: users, devices), ``("list", None)`` or ``("value", None)``."""
    union = get_origin(annotation) in (Union, UnionType)
    for a in get_args(annotation) if union else (annotation,):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return "model", a
        if get_origin(a) is dict:
            return "dict", get_args(a)[1]
        if get_origin(a) is list:
            return "list", None
    return "value", None


def env_key_problem(path: Sequence[str]) -> str | None:
    """Why the lower-case key path of an env override names no config key (None: it does)."""
    if not path or not all(path):
        return f"not a config key path ({ENV_PREFIX}SECTION__KEY)"
    kind, inner = "model", Config
    for depth, key in enumerate(path):
        here = ".".join(path[: depth + 1])
        if kind == "model":
            field = inner.model_fields.get(key)
            if field is None:
                return f"unknown config key {here}"
            kind, inner = _field_kind(field.annotation)
        elif kind == "dict":  # a name of the user's choosing (a user, a device)
            kind, inner = _field_kind(inner)
        elif kind == "list":
            above = ".".join(path[:depth])
            return (
                f"{above} is a list: set it whole ({ENV_PREFIX}{above.upper()}='[{{name: llm, "
                "url: ...}]') or in the file"
            )
        else:
            return f"unknown config key {here}"
    return None


def _named_env_vars(data: dict[str, Any]) -> set[str]:
    """Env vars the config itself names (secrets it reads): never overrides of its keys."""
    names = {data.get("admin_token_env")}
    upstreams = data.get("upstreams")
    for u in upstreams if isinstance(upstreams, list) else ():
        if isinstance(u, dict):
            names.add(u.get("api_key_env"))
    carbon = data.get("carbon")
    if isinstance(carbon, dict):
        names.add(carbon.get("token_env"))
    return {n for n in names if isinstance(n, str)}


def _env_key_path(name: str, named: set[str]) -> tuple[list[str] | None, str | None]:
    """``(key path, problem)`` of a ``WATTPROXY_*`` env var; ``(None, None)`` when it is no
    override. An override nests with ``__`` or names a top-level key; other names (reserved
    ones, secrets the config names, anything else without ``__``) are not overrides, except
    a section and one of its keys joined by a single ``_``, a likely slip."""
    if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED or name in named:
        return None, None
    rest = name[len(ENV_PREFIX) :].lower()
    if "__" in rest:
        path = rest.split("__")
        return path, env_key_problem(path)
    if rest in Config.model_fields:
        return [rest], None
    for section, field in Config.model_fields.items():
        kind, model = _field_kind(field.annotation)
        key = rest.removeprefix(section + "_")
        if kind == "model" and key != rest and key in model.model_fields:
            hint = f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
            return None, f"nested keys take a double underscore: {hint}"
    return None, None


def _env_overrides(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """``data`` with the ``WATTPROXY_*`` overrides applied, and the env vars that look like
    overrides but name no config key (``NAME: problem``)."""
    named = _named_env_vars(data)
    problems: list[str] = []
    for name, raw in sorted(environ.items()):
        path, problem = _env_key_path(name, named)
        if problem is not None:
            problems.append(f"{name}: {problem}")
        if path is None or problem is not None:
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
    return data, problems


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
    data, env_problems = _env_overrides(dict(data), os.environ if environ is None else environ)
    problems = [f"{origin}: {p}" for p in env_problems]
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(problems + _format_errors(err, origin)) from None
    problems += [f"{origin}: {p}" for p in _semantic_problems(cfg)]
    if problems:
        raise ConfigError(problems, config=cfg)
    return cfg


def _semantic_problems(cfg: Config) -> list[str]:
    """What a well-formed config can still get wrong: upstreams that can never be chosen, a
    carbon zone the static table lacks, a grid water figure the table cannot give."""
    # under a carbon or energy policy several upstreams may list the same model on purpose
    problems = shadowed_upstreams(cfg.upstreams) if cfg.routing.policy == "first" else []
    c = cfg.carbon
    zone_problem, _ = zone_findings(c.provider, c.zone, c.intensity_g_per_kwh)
    if zone_problem:
        problems.append(f"carbon.zone: {zone_problem}")
    water_problem = grid_water_problem(c)
    if water_problem:
        problems.append(f"carbon.grid_water_from_table: {water_problem}")
    for n, upstream in enumerate(cfg.upstreams):
        own = upstream.carbon
        if own is not None and own.zone is not None:
            fixed = own.intensity_g_per_kwh
            found, _ = zone_findings(c.provider, own.zone, fixed if fixed is not None else None)
            if found:
                problems.append(f"upstreams.{n}.carbon.zone: {found}")
            if c.grid_water_from_table and grid_water(own.zone) is None:
                problems.append(
                    f"upstreams.{n}.carbon.zone: {own.zone!r} has no row in the grid water "
                    "table (carbon.grid_water_from_table is on); its water cannot be reported"
                )
    return problems


def config_warnings(cfg: Config) -> list[str]:
    """What works but likely not as meant (``check-config`` prints these, ``serve`` logs them):
    a live provider's zone whose fallback would be the world average."""
    c = cfg.carbon
    _, zone_warning = zone_findings(c.provider, c.zone, c.intensity_g_per_kwh)
    return [f"carbon.zone: {zone_warning}"] if zone_warning else []


def _missing_folder(path: str) -> str | None:
    """The folder ``path`` would be written in, when it does not exist (never created for it:
    a typo would otherwise become a new folder, as root in a container)."""
    folder = os.path.dirname(os.path.abspath(path))
    return None if os.path.isdir(folder) else folder


def file_problems(cfg: Config) -> list[str]:
    """What the config names on this machine that is not there: the SQLite ledger's folder and
    the spool's. ``check-config`` and ``serve`` check these (relative paths from the working
    directory); ``parse_config`` does not, so a config can be read anywhere."""
    from proxy.errors import LedgerError
    from proxy.ledger.sqlite import SQLiteLedger

    problems = []
    if urlsplit(cfg.ledger.url).scheme == "sqlite":
        try:
            path = SQLiteLedger.from_url(cfg.ledger.url).path
        except LedgerError as e:
            problems.append(f"ledger.url: {e}")
        else:
            folder = None if path == ":memory:" else _missing_folder(path)
            if folder:
                problems.append(
                    f"ledger.url: the folder {folder} for the SQLite ledger does not exist "
                    "(create it first)"
                )
    folder = _missing_folder(cfg.ledger.spool_path)
    if folder:
        problems.append(
            f"ledger.spool_path: the folder {folder} for the spool does not exist (create it first)"
        )
    return problems


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
