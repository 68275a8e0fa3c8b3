"""`wattproxy check-config` and `serve` as real processes: every check a config can fail is
reported at once with its key path or file name, with a non-zero exit and no traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.helpers.serve import ROOT, WATTPROXY, free_port, wattproxy_serve


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The CLI of this checkout (PYTHONPATH: not an installed copy) run in ``cwd``."""
    environ = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*WATTPROXY, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=environ
    )


def write(tmp_path: Path, doc: dict[str, Any], name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


SHADOWED = {
    "upstreams": [
        {"name": "first", "url": "http://127.0.0.1:8000", "models": ["*"]},
        {"name": "second", "url": "http://127.0.0.1:8001", "models": ["*"]},
    ]
}


def test_check_config_and_serve_refuse_an_upstream_that_can_never_be_chosen(
    tmp_path: Path,
) -> None:
    cfg = write(tmp_path, SHADOWED)
    for args in (("check-config", str(cfg)), ("serve", "--config", str(cfg))):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert f"{cfg}: upstreams.1: upstream 'second' can never be chosen" in r.stderr
        assert "'first' (upstreams.0)" in r.stderr


def test_an_unknown_static_zone_is_refused_and_a_live_one_warned(tmp_path: Path) -> None:
    cfg = write(tmp_path, {"carbon": {"zone": "NOWHERE"}})
    for args in (("check-config", str(cfg)), ("serve", "--config", str(cfg))):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert f"{cfg}: carbon.zone: 'NOWHERE' is not in the built-in table" in r.stderr
        assert "Traceback" not in r.stderr
    live = write(tmp_path, {"carbon": {"provider": "electricitymaps", "zone": "XX-YY"}}, "l.yaml")
    r = run("check-config", str(live), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning: carbon.zone: 'XX-YY'" in r.stderr


def test_a_keys_file_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {key: k1, user: alice}\n  - {key: k1, user: mallory}\n")
    cfg = write(tmp_path, {"identity": {"keys_file": str(keys)}})
    for args in (("check-config", str(cfg)), ("serve", "--config", str(cfg))):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert f"{keys}: keys.1: the same key as keys.0 (user 'alice')" in r.stderr
        assert "Traceback" not in r.stderr


def test_an_env_override_naming_no_key_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path, {})
    for args in (("check-config", str(cfg)), ("serve", "--config", str(cfg))):
        r = run(*args, cwd=tmp_path, env={"WATTPROXY_LISTN__PORT": "9000"})
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "WATTPROXY_LISTN__PORT: unknown config key listn" in r.stderr
        assert "Traceback" not in r.stderr


async def test_serve_warns_at_startup_when_the_redis_ledger_is_unreachable(
    tmp_path: Path,
) -> None:
    """Once only /readyz said so. The warning names the ledger without its password, and
    the proxy serves all the same (the spool keeps the records)."""
    port = free_port()  # nothing listens there
    cfg = {
        "upstreams": [{"name": "llm", "url": "http://127.0.0.1:9"}],
        "meter": {"kind": "none"},
        "ledger": {
            "url": f"redis://wattproxy:s3cret-pw@127.0.0.1:{port}/0",
            "spool_path": str(tmp_path / "spool.jsonl"),
        },
    }
    async with (
        wattproxy_serve(cfg, tmp_path) as served,
        aiohttp.ClientSession() as s,
        s.get(served.base + "/healthz") as r,
    ):
        assert r.status == 200
    assert f"WARNING wattproxy: ledger redis://wattproxy:***@127.0.0.1:{port}/0" in served.output
    assert "unreachable" in served.output
    assert "s3cret-pw" not in served.output
    assert "Traceback" not in served.output


def test_estimate_refuses_an_unknown_task_with_the_known_ones(tmp_path: Path) -> None:
    """It used to answer for text-generation silently."""
    r = run("estimate", "--task", "nonsense", "--completion-tokens", "10", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert "unknown task 'nonsense'" in r.stderr
    for task in ("text-generation", "feature-extraction", "text-to-image", "summarization"):
        assert task in r.stderr
    assert "Traceback" not in r.stderr
    ok = run("estimate", "--task", "feature-extraction", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_a_sqlite_ledger_in_a_missing_folder_is_refused_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir"
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {key_sha256: nothex, user: alice}\n")
    cfg = write(
        tmp_path,
        {"ledger": {"url": f"sqlite:///{missing / 'x.db'}"}, "identity": {"keys_file": str(keys)}},
    )
    r = run("check-config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"ledger.url: the folder {missing} for the SQLite ledger does not exist" in r.stderr
    assert f"{keys}: keys.0: key_sha256 must be exactly 64 hex digits" in r.stderr  # all at once
    keys.write_text("keys:\n  - {key: k, user: alice}\n")
    r = run("serve", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"ledger.url: the folder {missing} for the SQLite ledger does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    assert not missing.parent.exists()


def test_check_config_lists_every_new_problem_at_once(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {key: k1, user: alice}\n  - {key: k1, user: mallory}\n")
    cfg = write(
        tmp_path,
        {
            **SHADOWED,
            "carbon": {"zone": "NOWHERE"},
            "ledger": {"url": f"sqlite:///{tmp_path / 'missing' / 'x.db'}"},
            "identity": {"keys_file": str(keys)},
        },
    )
    r = run("check-config", str(cfg), cwd=tmp_path, env={"WATTPROXY_LISTN__PORT": "1"})
    assert r.returncode == 2, (r.stdout, r.stderr)
    for problem in (
        f"{cfg}: WATTPROXY_LISTN__PORT: unknown config key listn",
        f"{cfg}: upstreams.1: upstream 'second' can never be chosen",
        f"{cfg}: carbon.zone: 'NOWHERE' is not in the built-in table",
        f"{cfg}: ledger.url: the folder {tmp_path / 'missing'} for the SQLite ledger",
        f"{keys}: keys.1: the same key as keys.0",
    ):
        assert problem in r.stderr, problem
    assert "(5 problem(s))" in r.stderr
