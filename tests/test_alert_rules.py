"""wattproxy's alerting rules: promtool accepts them, their unit tests pass (each alert fires in one
case and stays silent in another), and the Kubernetes PrometheusRule carries the same groups.

promtool comes from scripts/ensure-prometheus.sh (run by `make test`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"

SEVERITIES = {"critical", "warning", "info"}
#: The conditions the rules must cover, by alert name.
REQUIRED_ALERTS = {
    "WattproxyMeterDown": "wattproxy_meter_up",
    "WattproxyUnattributedEnergyHigh": "wattproxy_unattributed_energy_joules_total",
    "WattproxyCO2eRateHigh": "wattproxy_co2e_grams_total",
    "WattproxyBudgetRejections": "wattproxy_budget_rejections_total",
    "WattproxyLedgerBacklogGrowing": "wattproxy_ledger_backlog_records",
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text("utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load(RULES)["groups"] for r in g["rules"] if "alert" in r]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not installed (make test installs it: scripts/ensure-prometheus.sh)"
        )
    return path


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd)


def test_promtool_check_rules() -> None:
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = run_promtool("test", "rules", str(RULES_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_unit_tests_notice_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests have teeth: a meter alert that can no longer fire fails them."""
    broken = RULES.read_text("utf-8").replace("wattproxy_meter_up == 0", "wattproxy_meter_up == 2")
    assert broken != RULES.read_text("utf-8")
    (tmp_path / "alerts.yaml").write_text(broken)
    shutil.copy(RULES_TEST, tmp_path / "alerts_test.yaml")
    done = run_promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert done.returncode != 0
    assert "WattproxyMeterDown" in done.stdout + done.stderr


def test_the_required_alerts_exist_and_watch_their_metric() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    for name, metric in REQUIRED_ALERTS.items():
        assert name in rules, f"missing alert {name}"
        assert metric in rules[name]["expr"], f"{name} should watch {metric}"
    assert rules["WattproxyMeterDown"]["for"] in ("2m", "3m", "5m", "10m")


def test_every_alert_is_labelled_and_explained() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        assert re.fullmatch(r"Wattproxy[A-Z]\w+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: set `for`"
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), rule["alert"]
        assert len(ann["description"]) > len(ann["summary"]), rule["alert"]


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    doc = load(RULES_TEST)
    assert doc["rule_files"] == ["alerts.yaml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names <= fires, f"never seen firing: {sorted(names - fires)}"
    assert names <= silent, f"never seen silent: {sorted(names - silent)}"


def test_prometheus_rule_embeds_the_same_groups() -> None:
    docs = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text("utf-8")) if d]
    (rule,) = docs
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == load(RULES)["groups"]
