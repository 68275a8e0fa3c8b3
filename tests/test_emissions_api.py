"""The emission endpoints: who may read what (admin token, a user's own key, nothing), the
report's JSON and CSV, and errors."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import Parts
from tests.conftest import ProxyFactory, proxy_config, url_of
from tests.helpers.proxy_load import chat, settle

ADMIN_ENV = "WP_TEST_EMISSIONS_ADMIN_TOKEN"
ADMIN = "admin-secret-token"
ALICE_KEY = "alice-key-123"
BOB_KEY = "bob-key-456"

KEYS_YAML = f"""
keys:
  - key: {ALICE_KEY}
    user: alice
    team: research
  - key: {BOB_KEY}
    user: bob
    team: search
"""


@pytest.fixture
async def api(
    make_proxy: ProxyFactory,
    upstream: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, Parts, dict[str, str]]:
    """A proxy with keys and an admin token; alice sent two requests and bob one."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS_YAML)
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    cfg = proxy_config(
        url_of(upstream), tmp_path, identity={"keys_file": str(keys)}, admin_token_env=ADMIN_ENV
    )
    server, parts = await make_proxy(cfg)
    base = url_of(server)
    rids: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for name, key in (("alice", ALICE_KEY), ("alice2", ALICE_KEY), ("bob", BOB_KEY)):
            status, rid, _ = await chat(session, base, key=key)
            assert status == 200
            rids[name] = rid
    await settle(parts)
    return base, parts, rids


async def get(
    base: str, path: str, token: str | None = None, accept: str | None = None
) -> tuple[int, Any, dict[str, str]]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if accept is not None:
        headers["Accept"] = accept
    async with aiohttp.ClientSession() as session, session.get(base + path, headers=headers) as r:
        if r.content_type == "application/json":
            return r.status, await r.json(), dict(r.headers)
        return r.status, await r.text(), dict(r.headers)


def paths(rids: dict[str, str]) -> list[str]:
    return [
        f"/v1/emissions/requests/{rids['alice']}",
        "/v1/emissions/users/alice",
        "/v1/emissions/summary",
    ]


@pytest.mark.parametrize("token", [None, "wrong-token", ADMIN + "x", ""])
async def test_missing_or_invalid_credentials_get_401_everywhere(
    api: tuple[str, Parts, dict[str, str]], token: str | None
) -> None:
    base, _, rids = api
    for path in paths(rids):
        status, body, _ = await get(base, path, token)
        assert status == 401, path
        assert body["error"]["type"] == "authentication_error"


async def test_the_admin_reads_everything(api: tuple[str, Parts, dict[str, str]]) -> None:
    base, _, rids = api
    status, rec, _ = await get(base, f"/v1/emissions/requests/{rids['bob']}", ADMIN)
    assert status == 200
    assert rec["user"] == "bob"
    assert rec["team"] == "search"
    assert rec["final"] is True
    status, report, _ = await get(base, "/v1/emissions/users/bob", ADMIN)
    assert status == 200
    assert report["user"] == "bob"
    assert report["totals"]["requests"] == 1
    status, summary, _ = await get(base, "/v1/emissions/summary", ADMIN)
    assert status == 200
    assert summary["totals"]["requests"] == 3
    assert {g["key"]: g["requests"] for g in summary["by_user"]} == {"alice": 2, "bob": 1}


async def test_a_key_reads_its_own_user_only(api: tuple[str, Parts, dict[str, str]]) -> None:
    base, _, rids = api
    status, rec, _ = await get(base, f"/v1/emissions/requests/{rids['alice']}", ALICE_KEY)
    assert status == 200
    assert rec["request_id"] == rids["alice"]
    assert "key" not in rec
    assert ALICE_KEY not in str(rec)
    status, body, _ = await get(base, f"/v1/emissions/requests/{rids['bob']}", ALICE_KEY)
    assert status == 403
    assert body["error"]["type"] == "permission_error"

    status, report, _ = await get(base, "/v1/emissions/users/alice", ALICE_KEY)
    assert status == 200
    assert report["totals"]["requests"] == 2
    status, _, _ = await get(base, "/v1/emissions/users/bob", ALICE_KEY)
    assert status == 403
    status, _, _ = await get(base, "/v1/emissions/users/alice", BOB_KEY)
    assert status == 403

    status, body, _ = await get(base, "/v1/emissions/summary", ALICE_KEY)
    assert status == 403
    assert body["error"]["type"] == "permission_error"


async def test_the_report_has_the_specs_shape_and_sums(
    api: tuple[str, Parts, dict[str, str]],
) -> None:
    base, parts, rids = api
    status, report, _ = await get(base, "/v1/emissions/users/alice?group_by=task", ALICE_KEY)
    assert status == 200
    assert set(report) >= {"user", "from", "to", "totals", "groups", "equivalents"}
    totals = report["totals"]
    assert set(totals) >= {
        "requests",
        "energy_j",
        "co2e_g",
        "prompt_tokens",
        "completion_tokens",
        "measured_share",
    }
    mine = [parts.recent.get(rids["alice"]), parts.recent.get(rids["alice2"])]
    assert all(r is not None for r in mine)
    energy_j = sum(r.energy_j for r in mine if r is not None)
    co2e_g = sum(r.co2e_g for r in mine if r is not None)
    assert energy_j > 0
    assert totals["energy_j"] == pytest.approx(energy_j, abs=1e-6)
    assert totals["co2e_g"] == pytest.approx(co2e_g, abs=1e-8)
    assert [g["key"] for g in report["groups"]] == ["text-generation"]
    assert report["groups"][0]["requests"] == 2
    assert report["equivalents"]["smartphone_charges"] == pytest.approx(co2e_g / 8.22, abs=1e-6)


async def test_csv_when_asked_for_it(api: tuple[str, Parts, dict[str, str]]) -> None:
    base, _, _ = api
    _, report, _ = await get(base, "/v1/emissions/users/alice", ALICE_KEY)
    status, text, headers = await get(
        base, "/v1/emissions/users/alice", ALICE_KEY, accept="text/csv"
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "day",
        "requests",
        "energy_j",
        "co2e_g",
        "prompt_tokens",
        "completion_tokens",
        "measured_share",
        "embodied_co2e_g",  # added after (issue 15 item 3), the columns before unchanged
        "water_l",
    ]
    assert rows[-1]["day"] == "TOTAL"
    assert int(rows[-1]["requests"]) == report["totals"]["requests"] == 2
    assert float(rows[-1]["co2e_g"]) == pytest.approx(report["totals"]["co2e_g"])
    assert [r["day"] for r in rows[:-1]] == [g["key"] for g in report["groups"]]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("?from=yesterday", 400),
        ("?from=2026-11-10&to=2026-11-01", 400),
        ("?group_by=colour", 400),
        ("?from=2020-01-01&to=2020-01-31", 200),
    ],
)
async def test_bad_queries_get_400(
    api: tuple[str, Parts, dict[str, str]], query: str, status: int
) -> None:
    base, _, _ = api
    got, body, _ = await get(base, "/v1/emissions/users/alice" + query, ADMIN)
    assert got == status
    if status == 200:
        assert body["totals"]["requests"] == 0
    else:
        assert body["error"]["type"] == "invalid_request_error"


async def test_unknown_request_is_404(api: tuple[str, Parts, dict[str, str]]) -> None:
    base, _, _ = api
    status, body, _ = await get(base, "/v1/emissions/requests/no-such-id", ADMIN)
    assert status == 404
    assert body["error"]["type"] == "not_found_error"


async def test_records_are_read_back_from_the_ledger(
    api: tuple[str, Parts, dict[str, str]],
) -> None:
    base, parts, rids = api
    parts.recent._records.clear()  # as after a restart: only the ledger has it
    status, rec, _ = await get(base, f"/v1/emissions/requests/{rids['alice']}", ALICE_KEY)
    assert status == 200
    assert rec["user"] == "alice"
    status, _, _ = await get(base, f"/v1/emissions/requests/{rids['bob']}", ALICE_KEY)
    assert status == 403
