"""The deployment files under deploy/ agree with the product: metric names and labels of the SPEC,
real config keys, the ports each server listens on, images that can be pulled, and PromQL that
Prometheus parses and that returns data for an exposition shaped like wattproxy's.

Tools found on PATH are used (promtool, prometheus, kubectl); `make test` installs Prometheus
through scripts/ensure-prometheus.sh, so only kubectl's check may skip.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from proxy.config import ENV_PREFIX, ENV_RESERVED, Config, parse_config
from proxy.errors import ConfigError
from proxy.identity import KeyStore

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "wattproxy.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ENSURE_PROMETHEUS = ROOT / "scripts" / "ensure-prometheus.sh"

# --- the metric families ------------------------------------------------------------------------

#: The SPEC's metric table (used when SPEC.md is not beside the checkout; kept equal to it by
#: test_fallback_families_equal_spec): name -> (type, labels).
SPEC_FALLBACK: dict[str, tuple[str, tuple[str, ...]]] = {
    "wattproxy_requests_total": ("counter", ("upstream", "model", "task", "code")),
    "wattproxy_request_duration_seconds": ("histogram", ("upstream", "task")),
    "wattproxy_time_to_first_byte_seconds": ("histogram", ("upstream", "task")),
    "wattproxy_tokens_total": ("counter", ("upstream", "model", "task", "type")),
    "wattproxy_energy_joules_total": ("counter", ("upstream", "model", "task", "source")),
    "wattproxy_co2e_grams_total": ("counter", ("upstream", "model", "task", "source")),
    "wattproxy_request_energy_joules": ("histogram", ("task",)),
    "wattproxy_device_energy_joules_total": ("counter", ("device",)),
    "wattproxy_unattributed_energy_joules_total": ("counter", ("device", "reason")),
    "wattproxy_device_power_watts": ("gauge", ("device",)),
    "wattproxy_grid_carbon_intensity_grams_per_kwh": ("gauge", ("zone",)),
    "wattproxy_inflight_requests": ("gauge", ("upstream",)),
    "wattproxy_meter_up": ("gauge", ("device", "kind")),
    "wattproxy_ledger_errors_total": ("counter", ("backend",)),
    "wattproxy_ledger_backlog_records": ("gauge", ("backend",)),
    "wattproxy_budget_rejections_total": ("counter", ("scope",)),
}

#: Families the proxy exports beyond the SPEC's table.
EXTRA_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "wattproxy_estimator_relative_error": ("histogram", ()),
    "wattproxy_attributed_energy_joules_total": ("counter", ("device",)),
    "wattproxy_carbon_provider_info": ("gauge", ("provider", "zone", "fallback")),
    "wattproxy_request_outcomes_total": ("counter", ("upstream", "outcome")),
    "wattproxy_route_decisions_total": ("counter", ("upstream", "reason")),
    "wattproxy_embodied_co2e_grams_total": ("counter", ("upstream", "model", "task")),
    "wattproxy_device_embodied_co2e_grams_total": ("counter", ("device",)),
    "wattproxy_unattributed_embodied_co2e_grams_total": ("counter", ("device",)),
    "wattproxy_water_litres_total": ("counter", ("upstream", "model", "task")),
    "wattproxy_worker_restarts_total": ("counter", ()),
    "wattproxy_overloaded_requests_total": ("counter", ()),
}

#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


def _spec_path() -> Path | None:
    candidates = [
        os.environ.get("WATTPROXY_SPEC", ""),
        ROOT.parent / "shared" / "SPEC.md",
        ROOT / "shared" / "SPEC.md",
        Path("/work/shared/SPEC.md"),
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def parse_spec_metrics(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The rows of SPEC.md's metric table: `| `name`[, `name`] | type[, type] | labels |`."""
    families: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text.splitlines():
        if not line.startswith("| `wattproxy_"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(wattproxy_\w+)`", cells[0])
        types = [t.strip() for t in cells[1].split(",")]
        labels = tuple(
            part.strip() for part in re.sub(r"\([^)]*\)", "", cells[2]).split(",") if part.strip()
        )
        if len(types) == 1:
            types *= len(names)
        assert len(types) == len(names), line
        for name, kind in zip(names, types, strict=True):
            families[name] = (kind, labels)
    return families


def spec_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    path = _spec_path()
    return parse_spec_metrics(path.read_text("utf-8")) if path else dict(SPEC_FALLBACK)


def all_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    return {**spec_families(), **EXTRA_FAMILIES}


def series_family(name: str, families: dict[str, tuple[str, tuple[str, ...]]]) -> str | None:
    """The family a series name belongs to (histograms: _bucket, _sum, _count), else None."""
    if name in families and families[name][0] != "histogram":
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and families.get(base, ("",))[0] == "histogram":
            return base
    return None


def series_labels(name: str, families: dict[str, tuple[str, tuple[str, ...]]]) -> set[str]:
    family = series_family(name, families)
    assert family is not None, name
    labels = set(families[family][1]) | TARGET_LABELS
    if name.endswith("_bucket"):
        labels.add("le")
    return labels


SELECTOR = re.compile(r"\b(wattproxy_\w+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def check_promql(expr: str, families: dict[str, tuple[str, tuple[str, ...]]]) -> list[str]:
    """Problems with the metric names and labels one PromQL expression uses."""
    problems = []
    used_labels: set[str] = set()
    found = False
    for m in SELECTOR.finditer(expr):
        found = True
        name, selector = m.group(1), m.group(2) or ""
        if series_family(name, families) is None:
            problems.append(f"{name}: not a wattproxy series")
            continue
        labels = series_labels(name, families)
        used_labels |= labels
        for label, _op in MATCHER.findall(selector):
            if label not in labels:
                problems.append(f"{name}: no label {label!r}")
    if not found:
        problems.append("uses no wattproxy metric")
    for group in GROUPING.findall(expr):
        for label in (x.strip() for x in group.split(",")):
            if label and label not in used_labels:
                problems.append(f"by/without ({label}): no metric here has that label")
    if "histogram_quantile" in expr:
        if "_bucket" not in expr:
            problems.append("histogram_quantile over a series that is not a _bucket")
        if not re.search(r"\bby\s*\([^)]*\ble\b", expr):
            problems.append("histogram_quantile without `by (le, ...)`")
    return problems


def test_spec_parser_reads_every_row_kind() -> None:
    text = (
        "| `wattproxy_a_total` | counter | upstream, type (prompt, completion) |\n"
        "| `wattproxy_b_total`, `wattproxy_c` | counter, gauge | backend |\n"
        "| other | table | x |\n"
    )
    assert parse_spec_metrics(text) == {
        "wattproxy_a_total": ("counter", ("upstream", "type")),
        "wattproxy_b_total": ("counter", ("backend",)),
        "wattproxy_c": ("gauge", ("backend",)),
    }


def test_fallback_families_equal_spec() -> None:
    path = _spec_path()
    if path is None:
        pytest.skip("SPEC.md is not beside this checkout; the fallback table is in use")
    assert parse_spec_metrics(path.read_text("utf-8")) == SPEC_FALLBACK


def _code_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from proxy.metrics import Metrics

    metrics = Metrics(registry=CollectorRegistry())
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = value._type
            name = value._name + ("_total" if kind == "counter" else "")
            found[name] = (kind, tuple(value._labelnames))
    return found


def test_code_exports_the_families_the_deploy_files_know() -> None:
    code = _code_families()
    assert code, "proxy.metrics.Metrics registered no metric"
    for name, (kind, labels) in spec_families().items():
        assert name in code, f"{name} (SPEC) is not registered by proxy.metrics"
        assert code[name] == (kind, labels), name
    unknown = sorted(set(code) - set(all_families()))
    assert not unknown, f"families exported but unknown to deploy/docs (add them): {unknown}"


def test_check_promql_catches_bad_names_and_labels() -> None:
    fams = all_families()
    assert (
        check_promql('sum by (task) (rate(wattproxy_energy_joules_total{task="x"}[5m]))', fams)
        == []
    )
    assert check_promql("rate(wattproxy_energy_joules[5m])", fams)
    assert check_promql('wattproxy_device_power_watts{zone="x"}', fams)
    assert check_promql("sum by (model) (wattproxy_device_power_watts)", fams)
    assert check_promql(
        "histogram_quantile(0.9, rate(wattproxy_request_energy_joules_sum[5m]))", fams
    )
    assert check_promql("wattproxy_request_duration_seconds", fams)


# --- Grafana --------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text("utf-8"))


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query, template variables included."""
    exprs = [
        (p["title"], t["expr"])
        for p in dashboard_panels()
        for t in p.get("targets", [])
        if "expr" in t
    ]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, f"variable {var['name']}: {query}"
            exprs.append((f"variable {var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return exprs


GRAFANA_VARS = {"__rate_interval": "1m", "__range": "1h", "__interval": "1m"}


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables: durations for the built-ins, `.*` for template vars."""

    def repl(m: re.Match[str]) -> str:
        return GRAFANA_VARS.get(m.group(1), ".*")

    return re.sub(r"\$\{?(\w+)\}?", repl, expr)


def test_dashboard_is_a_grafana_dashboard() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36
    assert d["uid"] and d["title"]
    ds_vars = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds_vars] == [("DS_PROMETHEUS", "prometheus")]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel[
            "title"
        ]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x, y in itertools.product(
            range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        ):
            assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
            cells[(x, y)] = panel["title"]


def test_dashboard_queries_use_real_metrics_and_labels() -> None:
    fams = all_families()
    problems = [
        f"{title}: {p}" for title, expr in dashboard_exprs() for p in check_promql(expr, fams)
    ]
    assert not problems, "\n".join(problems)


def test_dashboard_covers_every_spec_family() -> None:
    fams = all_families()
    used = {
        series_family(name, fams)
        for _, expr in dashboard_exprs()
        for name, _selector in SELECTOR.findall(expr)
    }
    used_names = {u for u in used if u}
    missing = sorted(set(spec_families()) - used_names)
    assert not missing, f"no panel shows {missing}"


def test_dashboard_has_the_efficiency_and_latency_views() -> None:
    exprs = [e for _, e in dashboard_exprs()]

    def any_expr(*parts: str) -> bool:
        return any(all(p in e for p in parts) for e in exprs)

    assert any_expr("wattproxy_energy_joules_total", "/", "wattproxy_requests_total", "by (model)")
    assert any_expr("1000 *", "wattproxy_energy_joules_total", "wattproxy_tokens_total")
    assert any_expr("wattproxy_unattributed_energy_joules_total", "reason")
    assert any_expr('source="measured"', "wattproxy_energy_joules_total")
    for hist in ("wattproxy_request_duration_seconds", "wattproxy_time_to_first_byte_seconds"):
        assert any_expr("histogram_quantile(0.95", f"{hist}_bucket"), hist


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not installed (make test installs it: scripts/ensure-prometheus.sh)"
        )
    return path


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# Synthetic exposition: every family with every label set to a few values, counters growing at
# known rates, for the dashboard's queries to run against a real Prometheus.
LABEL_VALUES = {
    "upstream": ["llm", "embed"],
    "model": ["qwen2.5-1.5b"],
    "task": ["text-generation", "feature-extraction"],
    "code": ["200", "429"],
    "type": ["prompt", "completion"],
    "source": ["measured", "estimated"],
    "device": ["gpu0"],
    "reason": ["idle", "no_requests"],
    "zone": ["WORLD"],
    "kind": ["nvml"],
    "backend": ["redis"],
    "scope": ["user"],
    "provider": ["static"],
    "fallback": ["false"],
    "outcome": ["ok", "upstream_error"],
}
STEP_S = 15
STEPS = 240  # one hour
DEVICE_W = 300.0
UNATTRIBUTED_W_PER_REASON = 50.0
GAUGES = {
    "wattproxy_device_power_watts": DEVICE_W,
    "wattproxy_grid_carbon_intensity_grams_per_kwh": 475.0,
    "wattproxy_inflight_requests": 3.0,
    "wattproxy_meter_up": 1.0,
    "wattproxy_ledger_backlog_records": 5.0,
    "wattproxy_carbon_provider_info": 1.0,
}
BUCKETS = ("0.1", "1", "10", "100", "+Inf")


def _counter_w(name: str) -> float:
    """Counter growth per second."""
    return {
        "wattproxy_device_energy_joules_total": DEVICE_W,
        "wattproxy_unattributed_energy_joules_total": UNATTRIBUTED_W_PER_REASON,
    }.get(name, 2.0)


def _labelsets(labels: tuple[str, ...]) -> Iterator[str]:
    for values in itertools.product(*(LABEL_VALUES[label] for label in labels)):
        pairs = [f'{k}="{v}"' for k, v in zip(labels, values, strict=True)]
        yield ",".join([*pairs, 'instance="wp-a:8080"', 'job="wattproxy"'])


def openmetrics_history(t0: float) -> str:
    lines = []
    for name, (kind, labels) in sorted(all_families().items()):
        family = name.removesuffix("_total") if kind == "counter" else name
        lines.append(f"# TYPE {family} {kind}")
        for ls in _labelsets(labels):
            for i in range(STEPS):
                t = t0 + i * STEP_S
                if kind == "gauge":
                    lines.append(f"{name}{{{ls}}} {GAUGES[name]} {t}")
                elif kind == "counter":
                    lines.append(f"{name}{{{ls}}} {_counter_w(name) * STEP_S * i} {t}")
                else:
                    for n, le in enumerate(BUCKETS):
                        lines.append(f'{name}_bucket{{{ls},le="{le}"}} {min(n, 3) * i} {t}')
                    lines.append(f"{name}_count{{{ls}}} {3 * i} {t}")
                    lines.append(f"{name}_sum{{{ls}}} {15.0 * i} {t}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        qs = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        with urllib.request.urlopen(f"{self.base}/api/v1/query?{qs}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])


@pytest.fixture(scope="module")
def backfilled_prometheus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[_Prometheus, float]]:
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if promtool is None or prometheus is None:
        pytest.skip(
            "promtool/prometheus not installed (make test runs scripts/ensure-prometheus.sh)"
        )
    work = tmp_path_factory.mktemp("prom")
    t0 = float(int(time.time()) - STEPS * STEP_S)
    (work / "history.om").write_text(openmetrics_history(t0))
    data = work / "data"
    done = subprocess.run(
        [
            promtool,
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            str(work / "history.om"),
            str(data),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (work / "prometheus.yml").write_text("global: {evaluation_interval: 1m}\n")
    port = _free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=30d",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "prometheus.log", "w"),  # noqa: SIM115 - closed with the process
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (work / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield _Prometheus(base), t0 + (STEPS - 1) * STEP_S
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_every_dashboard_query_returns_data(
    backfilled_prometheus: tuple[_Prometheus, float],
) -> None:
    prom, at = backfilled_prometheus
    empty = []
    for title, expr in dashboard_exprs():
        result = prom.query(grafana_to_promql(expr), at)
        if not result:
            empty.append(f"{title}: {expr}")
    assert not empty, "queries with no result:\n" + "\n".join(empty)


def test_device_split_adds_up_to_measured_energy(
    backfilled_prometheus: tuple[_Prometheus, float],
) -> None:
    prom, at = backfilled_prometheus
    (panel,) = [p for p in dashboard_panels() if p["title"].startswith("Device energy: attributed")]
    by_ref = {t["refId"]: grafana_to_promql(t["expr"]) for t in panel["targets"]}
    attributed = prom.query(by_ref["A"], at)
    unattributed = prom.query(by_ref["B"], at)
    assert len(attributed) == 1 and len(unattributed) == 2
    a = float(attributed[0]["value"][1])
    u = sum(float(s["value"][1]) for s in unattributed)
    assert a == pytest.approx(DEVICE_W - 2 * UNATTRIBUTED_W_PER_REASON)
    assert a + u == pytest.approx(DEVICE_W)


def test_dashboard_stat_queries_give_plausible_values(
    backfilled_prometheus: tuple[_Prometheus, float],
) -> None:
    prom, at = backfilled_prometheus
    stats = {
        p["title"]: grafana_to_promql(p["targets"][0]["expr"])
        for p in dashboard_panels()
        if p["type"] == "stat"
    }
    share = float(prom.query(stats["Measured share"], at)[0]["value"][1])
    assert share == pytest.approx(0.5)
    assert float(prom.query(stats["Meters up"], at)[0]["value"][1]) == 1.0


# --- Grafana provisioning -------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text("utf-8"))


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (resolved against the compose dir) of a service's binds."""
    out = {}
    for vol in service.get("volumes", []):
        src, dst, *_ = vol.split(":")
        if src.startswith("."):
            out[dst] = str((COMPOSE.parent / src).resolve())
        else:
            out[dst] = src
    return out


def test_grafana_provisioning_matches_compose() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    url = urllib.parse.urlsplit(source["url"])
    services = compose()["services"]
    assert url.hostname in services and url.port == 9090
    providers = yaml.safe_load((prov / "dashboards" / "wattproxy.yaml").read_text())["providers"]
    (provider,) = providers
    mounts = _mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning"] == str(prov.resolve())
    dash_in_container = [dst for dst, src in mounts.items() if src == str(DASHBOARD.resolve())]
    assert dash_in_container, "the dashboard JSON is not mounted into grafana"
    assert Path(dash_in_container[0]).parent == Path(provider["options"]["path"])


# --- YAML, images, ports ----------------------------------------------------------------------


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text("utf-8")) if d)
    return docs


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def pod_specs() -> list[dict[str, Any]]:
    return [
        d["spec"]["template"]["spec"]
        for d in k8s_docs()
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]


def k8s_containers() -> list[dict[str, Any]]:
    return [
        c
        for spec in pod_specs()
        for c in spec.get("containers", []) + spec.get("initContainers", [])
    ]


def test_every_yaml_file_parses() -> None:
    files = deploy_yaml_files()
    assert len(files) >= 10
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk


def test_kubectl_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(done.stdout) if d)
    assert kinds == sorted(d["kind"] for d in k8s_docs())


IMAGE = re.compile(
    r"^(?P<registry>[a-z0-9.-]+(?::\d+)?)/(?P<path>[a-z0-9._/-]+):(?P<tag>[A-Za-z0-9._-]+)$"
)


def dockerfile_images() -> list[str]:
    stages = set()
    images = []
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line.strip(), re.IGNORECASE)
        if m:
            if m.group(1) not in stages:
                images.append(m.group(1))
            if m.group(2):
                stages.add(m.group(2))
    return images


def all_images() -> list[tuple[str, str]]:
    images = [(f"k8s container {c['name']}", c["image"]) for c in k8s_containers()]
    images += [(f"compose service {n}", s["image"]) for n, s in compose()["services"].items()]
    images += [("Dockerfile", i) for i in dockerfile_images()]
    return images


def test_images_are_fully_named_and_tagged() -> None:
    images = all_images()
    assert len(images) >= 10
    for where, image in images:
        m = IMAGE.match(image)
        assert m, f"{where}: {image!r} is not registry/path:tag"
        registry = m.group("registry")
        assert "." in registry or ":" in registry or registry == "localhost", f"{where}: {image}"
        assert m.group("tag") != "latest", f"{where}: pin a version, not latest"


def test_image_check_rejects_short_names() -> None:
    for bad in ("redis", "redis:7", "grafana/grafana:11.2.0", "docker.io/redis"):
        m = IMAGE.match(bad)
        assert m is None or not ("." in m.group("registry") or m.group("registry") == "localhost")


#: Image (repository path ends with) -> the port its server listens on.
PORTS = {
    "wattproxy": 8080,
    "vllm/vllm-openai": 8000,
    "nvidia/k8s/dcgm-exporter": 9400,
    "prom/prometheus": 9090,
    "grafana/grafana": 3000,
    "library/redis": 6379,
}


def expected_port(image: str) -> int | None:
    path = IMAGE.match(image)
    assert path, image
    for suffix, port in PORTS.items():
        if path.group("path").endswith(suffix):
            return port
    return None


def configmap_config() -> dict[str, Any]:
    (cm,) = [d for d in k8s_kind("ConfigMap") if d["metadata"]["name"] == "wattproxy-config"]
    return yaml.safe_load(cm["data"]["config.yaml"])


def test_k8s_container_ports_match_the_servers() -> None:
    seen = set()
    for c in k8s_containers():
        port = expected_port(c["image"])
        assert port is not None, f"unknown image {c['image']}"
        seen.add(port)
        assert port in [p["containerPort"] for p in c.get("ports", [])], c["name"]
        args = c.get("args", [])
        if "--port" in args:
            assert args[args.index("--port") + 1] == str(port), c["name"]
    assert {8080, 8000, 6379} <= seen
    assert parse_config(configmap_config(), environ={}).listen.port == PORTS["wattproxy"]


def test_compose_ports_match_the_servers() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        port = expected_port(svc["image"])
        assert port is not None, name
        published = [int(str(p).split(":")[-1]) for p in svc.get("ports", [])]
        exposed = [int(p) for p in svc.get("expose", [])]
        assert port in published + exposed, f"{name}: {port} neither published nor exposed"
    cmd = services["vllm"]["command"]
    assert cmd[cmd.index("--port") + 1] == "8000"
    env = services["wattproxy"]["environment"]
    assert urllib.parse.urlsplit(env["WATTPROXY_LEDGER__URL"]).port == 6379
    assert urllib.parse.urlsplit(env["WATTPROXY_METER__DCGM_URL"]).port == 9400


def test_prometheus_scrapes_the_right_ports() -> None:
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {
        job["job_name"]: t
        for job in prom["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    services = compose()["services"]
    for job, port in (("wattproxy", 8080), ("dcgm-exporter", 9400), ("vllm", 8000)):
        host, _, p = targets[job].partition(":")
        assert host in services and int(p) == port, job


def test_prometheus_config_is_valid_and_loads_the_alerts() -> None:
    promtool = _promtool()
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    globs = yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"]
    mounts = _mounts(compose()["services"]["prometheus"])
    rules_in_container = [dst for dst, src in mounts.items() if src == str(ALERTS.resolve())]
    assert rules_in_container and any(fnmatch.fnmatch(rules_in_container[0], g) for g in globs)
    assert mounts["/etc/prometheus/prometheus.yml"] == str(PROMETHEUS_YML.resolve())


def test_compose_reserves_gpus_and_builds_wattproxy() -> None:
    services = compose()["services"]
    for line in COMPOSE.read_text("utf-8").splitlines():
        if not line.lstrip().startswith("#"):
            assert "$(" not in line, f"compose interpolates `$`: write `$$(` ({line.strip()})"
    assert set(services) >= {"vllm", "wattproxy", "redis", "prometheus", "grafana", "dcgm-exporter"}
    for name in ("vllm", "dcgm-exporter"):
        (dev,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
    build = services["wattproxy"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    for svc in services.values():
        for dst, src in _mounts(svc).items():
            if src.startswith("/"):
                assert Path(src).exists(), f"{dst}: {src} does not exist"


# --- config and env -------------------------------------------------------------------------


def config_key_exists(path: list[str]) -> bool:
    """Whether a.b.c names a field of Config (through nested models)."""
    model: type[BaseModel] | None = Config
    for key in path:
        if model is None or key not in model.model_fields:
            return False
        annotation = model.model_fields[key].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return True


def env_name_is_config(name: str) -> bool:
    if name in ENV_RESERVED or name == "WATTPROXY_ADMIN_TOKEN":
        return True
    path = [p.lower() for p in name.removeprefix(ENV_PREFIX).split("__")]
    return all(path) and config_key_exists(path)


def test_env_name_check_has_teeth() -> None:
    assert env_name_is_config("WATTPROXY_LISTEN__HOST")
    assert env_name_is_config("WATTPROXY_METER__DCGM_URL")
    assert not env_name_is_config("WATTPROXY_LISTEN__HOTS")
    assert not env_name_is_config("WATTPROXY_METER__DCGM_URL__X")
    assert not env_name_is_config("WATTPROXY_LEDGER_URL")


def test_every_wattproxy_env_var_is_a_config_key() -> None:
    files = [
        *deploy_yaml_files(),
        DOCKERFILE,
        ROOT / "docs" / "deploy.md",
        ROOT / "docs" / "metrics.md",
    ]
    names: dict[str, Path] = {}
    for path in files:
        for name in re.findall(r"\bWATTPROXY_[A-Z0-9_]*[A-Z0-9]", path.read_text("utf-8")):
            names.setdefault(name, path)
    assert "WATTPROXY_LEDGER__URL" in names and "WATTPROXY_METER__KIND" in names
    bad = sorted(
        f"{n} ({p.relative_to(ROOT)})" for n, p in names.items() if not env_name_is_config(n)
    )
    assert not bad, f"env vars that name no config key: {bad}"


def test_configmap_config_validates() -> None:
    cfg = parse_config(configmap_config(), "configmap", environ={})
    (upstream,) = cfg.upstreams
    assert urllib.parse.urlsplit(upstream.url).port == 8000
    assert cfg.meter.kind == "nvml"
    assert cfg.identity.keys_file
    (deploy,) = k8s_kind("Deployment")
    (proxy,) = [
        c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "wattproxy"
    ]
    config_path = proxy["args"][proxy["args"].index("--config") + 1]
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    cm_mount = next(
        n for n, v in volumes.items() if v.get("configMap", {}).get("name") == "wattproxy-config"
    )
    assert config_path == f"{mounts[cm_mount]}/config.yaml"
    secret_mount = next(n for n, v in volumes.items() if "secret" in v and n in mounts)
    assert Path(cfg.identity.keys_file).parent == Path(mounts[secret_mount])
    assert cfg.ledger.spool_path.startswith("/var/lib/wattproxy/")
    assert "/var/lib/wattproxy" in mounts.values()


def test_configmap_env_overrides_validate() -> None:
    env = {}
    (deploy,) = k8s_kind("Deployment")
    for c in deploy["spec"]["template"]["spec"]["containers"]:
        for e in c.get("env", []):
            if e["name"].startswith(ENV_PREFIX) and "value" in e:
                env[e["name"]] = e["value"]
    env["WATTPROXY_LEDGER__URL"] = "rediss://:secret@redis.example.com:6380/0"
    env["WATTPROXY_METER__KIND"] = "dcgm"
    env["WATTPROXY_METER__DCGM_URL"] = "http://10.0.0.7:9400/metrics"
    cfg = parse_config(configmap_config(), "configmap+env", environ=env)
    assert cfg.meter.kind == "dcgm" and cfg.ledger.url.startswith("rediss://")


def test_config_check_has_teeth() -> None:
    bad = configmap_config()
    bad["meter"] = {**bad["meter"], "kind": "nvlm"}
    with pytest.raises(ConfigError):
        parse_config(bad, environ={})


def test_compose_config_validates_with_its_env() -> None:
    svc = compose()["services"]["wattproxy"]
    env = {k: str(v) for k, v in svc["environment"].items() if k != "WATTPROXY_ADMIN_TOKEN"}
    doc = yaml.safe_load((COMPOSE.parent / "wattproxy.yaml").read_text())
    cfg = parse_config(doc, "compose", environ=env)
    assert cfg.meter.kind == "dcgm"
    assert cfg.meter.dcgm_url == "http://dcgm-exporter:9400/metrics"
    assert cfg.ledger.url == "redis://redis:6379/0"
    assert cfg.listen.host == "0.0.0.0" and cfg.listen.port == 8080
    (upstream,) = cfg.upstreams
    assert upstream.url == "http://vllm:8000"
    mounts = _mounts(svc)
    assert mounts["/etc/wattproxy/config.yaml"] == str(
        (COMPOSE.parent / "wattproxy.yaml").resolve()
    )
    keys_host = Path(mounts[cfg.identity.keys_file])
    assert len(KeyStore.load(keys_host)) >= 1


def test_k8s_secret_holds_what_the_pod_reads(tmp_path: Path) -> None:
    (secret,) = k8s_kind("Secret")
    data = secret["stringData"]
    keys = tmp_path / "keys.yaml"
    keys.write_text(data["keys.yaml"])
    assert len(KeyStore.load(keys)) >= 1
    name = secret["metadata"]["name"]
    for c in k8s_containers():
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == name
                assert ref.get("optional") or ref["key"] in data, f"{c['name']}: {ref['key']}"
    for spec in pod_specs():
        for v in spec.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] == name
                assert all(i["key"] in data for i in v["secret"].get("items", []))


def test_docker_default_config_validates() -> None:
    doc = yaml.safe_load((DEPLOY / "docker" / "config.yaml").read_text())
    cfg = parse_config(doc, "image", environ={})
    assert cfg.listen.host == "0.0.0.0" and cfg.listen.port == 8080


# --- Kubernetes wiring ---------------------------------------------------------------------


def test_k8s_objects_reference_each_other() -> None:
    (deploy,) = k8s_kind("Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    containers = {c["name"]: c for c in deploy["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"vllm", "wattproxy"}, "wattproxy runs as the model server's sidecar"
    proxy_ports = {p["name"]: p["containerPort"] for p in containers["wattproxy"]["ports"]}
    (svc,) = [s for s in k8s_kind("Service") if s["spec"]["selector"].items() <= pod_labels.items()]
    (port,) = svc["spec"]["ports"]
    assert proxy_ports[port["targetPort"]] == 8080 and port["port"] == 8080
    (sm,) = k8s_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [port["name"]]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    for c in containers.values():
        names = {p["name"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c and "httpGet" in c[probe]:
                assert c[probe]["httpGet"]["port"] in names, f"{c['name']} {probe}"
    assert containers["wattproxy"]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert containers["wattproxy"]["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (netpol,) = k8s_kind("NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed = [p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]]
    assert allowed == [8080], "only the proxy's port may be reachable"
    (redis_svc,) = [s for s in k8s_kind("Service") if s["metadata"]["name"] == "wattproxy-redis"]
    ledger = urllib.parse.urlsplit(configmap_config()["ledger"]["url"])
    assert ledger.hostname == redis_svc["metadata"]["name"] and ledger.port == 6379


def test_k8s_sidecar_runs_unprivileged_and_sees_the_gpu() -> None:
    (deploy,) = k8s_kind("Deployment")
    containers = {c["name"]: c for c in deploy["spec"]["template"]["spec"]["containers"]}
    sc = containers["wattproxy"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in containers["wattproxy"]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"]
    assert "nvidia.com/gpu" in containers["vllm"]["resources"]["limits"]
    grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    shutdown = parse_config(configmap_config(), environ={}).listen.shutdown_grace_s
    assert grace > shutdown


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_a_slim_unprivileged_image() -> None:
    ins = dockerfile_instructions()
    froms = [rest.split()[0] for op, rest in ins if op == "FROM" and "/" in rest.split()[0]]
    assert froms and all(f.endswith("/python:3.11-slim") for f in froms)
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("EXPOSE", "8080") in ins
    assert any(
        op == "RUN" and re.search(r"pip install\s+[\"']?\.(\[|[\"'\s]|$)", rest) for op, rest in ins
    ), "the image must `pip install .` the project"
    (health,) = [rest for op, rest in ins if op == "HEALTHCHECK"]
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    cmd = json.loads(next(rest for op, rest in ins if op == "CMD"))
    assert entry == ["wattproxy"] and cmd[0] == "serve"
    config_in_image = cmd[cmd.index("--config") + 1]
    copies = [rest.split() for op, rest in ins if op == "COPY" and "--from" not in rest]
    assert any(c[-1] == config_in_image and (ROOT / c[0]).is_file() for c in copies)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# --- docs -----------------------------------------------------------------------------------


def test_metrics_doc_describes_every_family_and_otel_names() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text("utf-8")
    for name, (_kind, labels) in all_families().items():
        assert f"`{name}`" in text, f"docs/metrics.md does not describe {name}"
        for label in labels:
            assert f"`{label}`" in text, f"{name}: label {label} undocumented"
    for otel in (
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.request.model",
        "gen_ai.operation.name",
        "gen_ai.client.token.usage",
        "gen_ai.server.request.duration",
        "gen_ai.server.time_to_first_token",
    ):
        assert otel in text, otel


def test_deploy_doc_points_at_files_that_exist() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text("utf-8")
    paths = set(re.findall(r"\b((?:deploy|scripts|docs)/[\w./-]*\w)", text))
    assert len(paths) >= 8
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
    for needle in ("docker compose", "kubectl apply", "OPENAI_BASE_URL", ":8080/v1"):
        assert needle in text, needle


# --- scripts/ensure-prometheus.sh -----------------------------------------------------------


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


#: What the script and the stubs run besides apt-get, promtool and prometheus.
SANDBOX_TOOLS = (
    "bash",
    "sh",
    "id",
    "mktemp",
    "tee",
    "chmod",
    "rm",
    "tail",
    "head",
    "env",
    "touch",
    "cat",
    "cp",
)


def _sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A bin dir holding only the basic tools (so a real promtool stays out of sight)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in SANDBOX_TOOLS:
        real = shutil.which(tool)
        assert real, tool
        (bin_dir / tool).symlink_to(real)
    env = {k: v for k, v in os.environ.items() if k not in ("RUNLEVEL", "DEBIAN_FRONTEND")}
    env["PATH"] = str(bin_dir)
    env["POLICY_RC_D"] = str(tmp_path / "policy-rc.d")
    env["TMPDIR"] = str(tmp_path)
    return bin_dir, env


def _run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash
    return subprocess.run([bash, str(ENSURE_PROMETHEUS)], env=env, capture_output=True, text=True)


def test_ensure_prometheus_is_a_no_op_when_installed(tmp_path: Path) -> None:
    bin_dir, env = _sandbox(tmp_path)
    _stub(bin_dir / "promtool", "exit 0\n")
    _stub(bin_dir / "prometheus", "exit 0\n")
    _stub(bin_dir / "apt-get", f"touch {tmp_path}/apt-called\n")
    done = _run_script(env)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "apt-called").exists()
    assert not (tmp_path / "policy-rc.d").exists()


def test_ensure_prometheus_installs_without_starting_the_service(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the script installs as root (or through sudo)")
    bin_dir, env = _sandbox(tmp_path)
    policy = env["POLICY_RC_D"]
    # A fake apt-get: `install` fails until `update` ran, then records what it saw and
    # "installs" promtool and prometheus.
    _stub(
        bin_dir / "apt-get",
        f"""echo "$*" >> {tmp_path}/apt-args
case "$1" in
  update) touch {tmp_path}/updated ;;
  install)
    [ -e {tmp_path}/updated ] || exit 100
    echo "RUNLEVEL=$RUNLEVEL DEBIAN_FRONTEND=$DEBIAN_FRONTEND" > {tmp_path}/apt-env
    cat {policy} > {tmp_path}/policy-seen 2>/dev/null
    printf '#!/bin/sh\\necho "promtool, version 9"\\n' > {bin_dir}/promtool
    cp {bin_dir}/promtool {bin_dir}/prometheus
    chmod +x {bin_dir}/promtool {bin_dir}/prometheus ;;
esac
""",
    )
    done = _run_script(env)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "apt-args").read_text().splitlines()
    assert args == [
        "install -y --no-install-recommends prometheus",
        "update",
        "install -y --no-install-recommends prometheus",
    ]
    assert (tmp_path / "apt-env").read_text().split() == [
        "RUNLEVEL=1",
        "DEBIAN_FRONTEND=noninteractive",
    ]
    assert "exit 101" in (tmp_path / "policy-seen").read_text()
    assert not Path(policy).exists(), "the temporary policy-rc.d must be removed"
    # Idempotent: the second run installs nothing.
    again = _run_script(env)
    assert again.returncode == 0
    assert len((tmp_path / "apt-args").read_text().splitlines()) == 3


def test_ensure_prometheus_fails_loudly_when_apt_fails(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the script installs as root (or through sudo)")
    bin_dir, env = _sandbox(tmp_path)
    _stub(bin_dir / "apt-get", "echo 'E: Unable to locate package prometheus' >&2; exit 100\n")
    done = _run_script(env)
    assert done.returncode != 0
    assert "apt-get install prometheus failed" in done.stderr
    assert not Path(env["POLICY_RC_D"]).exists()
