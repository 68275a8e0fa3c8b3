"""The command line: real processes, real exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import url_of
from tests.helpers.serve import ROOT, WATTPROXY, wattproxy_serve


def run(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WATTPROXY, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT
    )


def test_check_config_ok() -> None:
    r = run("check-config", "config.yaml")
    assert r.returncode == 0
    assert "config.yaml: ok" in r.stdout


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {port: -1}\nmeter: {kind: gpu}\nledger: {url: mysql://x}\n")
    r = run("check-config", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{bad}: listen.port:" in r.stderr
    assert f"{bad}: meter.kind:" in r.stderr
    assert f"{bad}: ledger.url:" in r.stderr


def test_serve_refuses_a_bad_config_with_the_same_messages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [{url: 'not a url'}]\n")
    r = run("serve", "--config", str(bad))
    assert r.returncode == 2
    assert f"{bad}: upstreams.0.url:" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_bad_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - user: alice\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"identity": {"keys_file": str(keys)}}))
    r = run("check-config", str(cfg))
    assert r.returncode == 2
    assert "keys.0: needs 'key_sha256'" in r.stderr


async def test_serve_proxies_and_shuts_down_gracefully(upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = {
        "upstreams": [{"name": "llm", "url": url_of(upstream)}],
        "meter": {"kind": "simulated", "interval_ms": 20},
        "ledger": {"url": f"sqlite:///{tmp_path / 'l.db'}"},
    }
    async with wattproxy_serve(cfg, tmp_path) as served, aiohttp.ClientSession() as s:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with s.post(served.base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
    assert served.proc.returncode == 0, served.output
    assert "Traceback" not in served.output
    # the ledger was flushed on the way out
    r = run(
        "report", "--user", "anonymous", "--format", "json", "--config",
        str(served.config_path), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["totals"]["requests"] == 1
    assert report["totals"]["energy_j"] > 0


def test_report_bad_dates(tmp_path: Path) -> None:
    r = run("report", "--user", "x", "--from", "yesterday", cwd=tmp_path)
    assert r.returncode == 2
    assert "ISO dates" in r.stderr


@pytest.mark.timeout(90)
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    r = run("demo", "--requests", "40", "--out", str(tmp_path / "out"), timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    for text in ("Per task", "text-to-image", "Per user", "alice", "paper kWh/1000"):
        assert text in r.stdout
    metrics = (tmp_path / "out" / "metrics.prom").read_text()
    assert "wattproxy_energy_joules_total" in metrics
    assert 'source="measured"' in metrics


def test_serve_lifts_the_open_file_limit_to_the_hard_limit() -> None:
    code = (
        "import resource\n"
        "from proxy.server import raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))\n"
        "got = raise_fd_limit()\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got\n"
        "assert got == hard or hard == resource.RLIM_INFINITY, (got, hard)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_report_refuses_a_missing_sqlite_ledger(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"ledger": {"url": "sqlite:///nowhere/ledger.db"}}))
    r = run("report", "--user", "alice", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    assert "no ledger at" in r.stderr and "nowhere/ledger.db" in r.stderr
    assert not (tmp_path / "nowhere").exists()  # nothing was created
