"""Secrets: a client's key is compared in constant time, stored hashed, and never appears in a
log line, a metric, the ledger, the spool, an error, an emissions answer or a report; the
upstream gets its own key, never the client's; admin endpoints need the admin token; /metrics
can live on its own listener."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import identity as identity_module
from proxy.identity import IdentityResolver, KeyStore
from proxy.reports import api as report_api
from proxy.standins import StandIn
from tests.conftest import proxy_config, url_of
from tests.helpers.raw_http import raw_exchange
from tests.helpers.serve import ROOT, WATTPROXY, base_config, serve_process
from tests.helpers.service import running
from tests.helpers.through_proxy import CHAT

PLANTED = "sk-wattproxy-PLANTED-7f3a9c1e5b"  # alice's key, plaintext in the keys file
BAD_KEY = "sk-wattproxy-WRONGKEY-0d2b4f"  # a key nobody has
BOB_KEY = "sk-wattproxy-BOBKEY-93ac11"  # bob's key, stored as sha256 only
UPSTREAM_KEY = "upstream-secret-UPKEY-5e1d"
ADMIN_TOKEN = "admin-token-ADMIN-77c2"
SECRETS = (PLANTED, BAD_KEY, BOB_KEY, UPSTREAM_KEY, ADMIN_TOKEN)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"key": PLANTED, "user": "alice", "team": "research"},
                    {"key_sha256": sha256_hex(BOB_KEY), "user": "bob", "team": "search"},
                ]
            }
        )
    )
    return path


def leaks(text: str | bytes, where: str, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f"{secret} in {where}" for secret in secrets if secret.encode() in data]


@pytest.mark.timeout(90)
async def test_no_key_leaks_anywhere_through_a_real_process(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    standin = StandIn(flavor="vllm", scale=0.0)
    up: TestServer = await aiohttp_server(standin.app())
    doc = base_config(url_of(up), tmp_path)
    doc["upstreams"] = [
        {"name": "llm", "url": url_of(up), "prefix": "/v1", "api_key_env": "UPSTREAM_TOKEN"}
    ]
    doc["identity"] = {"keys_file": str(keys_file(tmp_path))}
    doc["budgets"] = {"users": {"bob": {"grams_per_day": 0}}}
    doc["log"] = {"level": "debug", "access_log": True}
    env = {"UPSTREAM_TOKEN": UPSTREAM_KEY, "WATTPROXY_ADMIN_TOKEN": ADMIN_TOKEN}
    answers: dict[str, bytes] = {}

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async with serve_process(doc, tmp_path, env=env) as served, aiohttp.ClientSession() as s:
        base = served.base

        async def call(name: str, method: str, path: str, **kw: Any) -> int:
            async with s.request(method, base + path, **kw) as r:
                answers[name] = await r.read() + json.dumps(dict(r.headers)).encode()
                return r.status

        chat_url = "/v1/chat/completions"
        assert await call("chat", "POST", chat_url, json=CHAT, headers=auth(PLANTED)) == 200
        stream = {**CHAT, "stream": True}
        assert await call("stream", "POST", chat_url, json=stream, headers=auth(PLANTED)) == 200
        xkey = {"x-api-key": PLANTED}
        assert await call("xkey", "GET", "/v1/models", headers=xkey) == 200
        assert await call("bad", "POST", chat_url, json=CHAT, headers=auth(BAD_KEY)) == 401
        assert await call("nokey", "POST", chat_url, json=CHAT) == 401
        assert await call("404", "GET", "/elsewhere", headers=auth(PLANTED)) == 404
        assert await call("429", "POST", chat_url, json=CHAT, headers=auth(BOB_KEY)) == 429
        # a malformed head whose offending line is the key itself: aiohttp's parser error
        # quotes that line, and would log it with a traceback; the proxy logs one plain line
        # and answers in its JSON shape, quoting nothing (the answer is grepped with the rest)
        bad = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PLANTED}"
        malformed = await raw_exchange(served.port, (bad + "a" * 9000 + "\r\n\r\n").encode())
        assert malformed.status == 400
        assert malformed.headers["content-type"].startswith("application/json")
        answers["malformed"] = malformed.body

        async with s.post(base + chat_url, json=CHAT, headers=auth(PLANTED)) as r:
            rid = r.headers["X-Request-Id"]
            await r.read()
        assert (
            await call("own-record", "GET", f"/v1/emissions/requests/{rid}", headers=auth(PLANTED))
            == 200
        )
        assert (
            await call("own-report", "GET", "/v1/emissions/users/alice", headers=auth(PLANTED))
            == 200
        )
        assert (
            await call(
                "csv-report",
                "GET",
                "/v1/emissions/users/alice",
                headers={**auth(PLANTED), "Accept": "text/csv"},
            )
            == 200
        )
        # admin endpoints need the admin token
        assert await call("summary-nokey", "GET", "/v1/emissions/summary") == 401
        assert (
            await call("summary-user", "GET", "/v1/emissions/summary", headers=auth(PLANTED)) == 403
        )
        assert (
            await call("summary-bad", "GET", "/v1/emissions/summary", headers=auth(BAD_KEY)) == 401
        )
        assert (
            await call("others-report", "GET", "/v1/emissions/users/bob", headers=auth(PLANTED))
            == 403
        )
        assert (
            await call("summary", "GET", "/v1/emissions/summary", headers=auth(ADMIN_TOKEN)) == 200
        )
        assert (
            await call("bob-report", "GET", "/v1/emissions/users/bob", headers=auth(ADMIN_TOKEN))
            == 200
        )
        assert await call("metrics", "GET", "/metrics") == 200
        assert served.stop() == 0

    for fmt in ("json", "csv", "table", "html"):
        r = subprocess.run(
            [
                *WATTPROXY,
                "report",
                "--user",
                "alice",
                "--format",
                fmt,
                "--config",
                str(served.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        assert r.returncode == 0, r.stderr
        answers[f"report-{fmt}"] = (r.stdout + r.stderr).encode()
    report = json.loads(answers["report-json"].decode())
    assert report["totals"]["requests"] == 4  # chat, stream, models, the one read back

    found: list[str] = []
    out = served.output()
    found += leaks(out, "the process output (debug log and access log)")
    for name, data in answers.items():
        found += leaks(data, f"the answer to {name}", (PLANTED, BAD_KEY, BOB_KEY, UPSTREAM_KEY))
    found += leaks((tmp_path / "ledger.db").read_bytes(), "the SQLite ledger")
    for extra in tmp_path.glob("ledger.db-*"):  # WAL and shared-memory files
        found += leaks(extra.read_bytes(), extra.name)
    spool = tmp_path / "spool.jsonl"
    if spool.exists():
        found += leaks(spool.read_bytes(), "the spool")
    # not even the full hash: the ledger keeps a short prefix (a key id) at most
    full_hashes = (sha256_hex(PLANTED), sha256_hex(BOB_KEY))
    found += leaks((tmp_path / "ledger.db").read_bytes(), "the ledger (full hash)", full_hashes)
    found += leaks(out, "the output (full hash)", full_hashes)
    assert found == []

    # the access log did log the requests (so the grep above looked at something)
    assert out.count('"user":"alice"') >= 3
    assert "refused a malformed request (LineTooLong, HTTP 400)" in out

    # the upstream got its own key and never a client's
    assert len(standin.requests) == 3  # chat, stream, the one read back (models is not kept)
    for seen in standin.requests:
        headers = CIMultiDict(seen["headers"])
        assert headers.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
        assert "x-api-key" not in headers
        assert leaks(json.dumps(seen), "the upstream request", (PLANTED, BAD_KEY, BOB_KEY)) == []


def test_keys_are_stored_hashed_and_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore.load(keys_file(tmp_path))
    held = repr(vars(store)) + repr(store._by_hash)
    assert PLANTED not in held and BOB_KEY not in held
    assert set(store._by_hash) == {sha256_hex(PLANTED), sha256_hex(BOB_KEY)}

    compared: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(identity_module.hmac, "compare_digest", spy)
    resolver = IdentityResolver(store, allow_header_identity=False)
    who = resolver.resolve(CIMultiDictProxy(CIMultiDict(Authorization=f"Bearer {PLANTED}")))
    assert who.user == "alice" and who.key_id == sha256_hex(PLANTED)[:12]
    assert compared, "the key was not confirmed with hmac.compare_digest"
    assert all(PLANTED not in repr(pair) for pair in compared)  # only hashes are compared
    assert store.lookup(BAD_KEY) is None
    # the admin token, too, is compared with hmac.compare_digest
    assert report_api.hmac is hmac
    assert "compare_digest" in Path(report_api.__file__).read_text()


async def test_metrics_on_their_own_listener(upstream: TestServer, tmp_path: Path) -> None:
    """With ``listen.metrics_port`` set, /metrics is served there only; on the main port the
    path belongs to the upstream namespace and is proxied like any other (documented)."""
    cfg = proxy_config(
        url_of(upstream),
        tmp_path,
        listen={"host": "127.0.0.1", "port": 0, "metrics_port": 0},
    )
    async with running(cfg) as svc, aiohttp.ClientSession() as s:
        assert svc.metrics_port is not None and svc.metrics_port != svc.port
        async with s.post(f"http://127.0.0.1:{svc.port}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{svc.metrics_port}/metrics") as r:
            assert r.status == 200
            assert "wattproxy_requests_total" in await r.text()
        async with s.get(f"http://127.0.0.1:{svc.port}/metrics") as r:
            assert r.status == 404  # the stand-in upstream has no /metrics
            assert "wattproxy_requests_total" not in await r.text()
            assert r.headers["X-Wattproxy-Task"] == "other"  # it went through the proxy
        async with s.get(f"http://127.0.0.1:{svc.metrics_port}/v1/models") as r:
            assert r.status == 404  # the metrics listener proxies nothing
