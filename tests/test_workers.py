"""``wattproxy serve`` with ``listen.workers: 2``: two worker processes accept on one port and
one accounting process owns the meter, the engine, the ledger, the budgets and ``/metrics``.
Every promise of a single process is checked again here, through real processes and signals:
conservation, provisional then final records, budgets, reload, drain, the ledger, and a worker
that dies (restarted, its requests closed as ``proxy_restart``, nothing counted twice)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.ledger.sqlite import SQLiteLedger
from proxy.records import RequestRecord
from proxy.standins import StandIn
from tests.conftest import url_of
from tests.helpers.budget_burst import Gate, budget_config, burst, gated_app, request_g
from tests.helpers.serve import (
    ROOT,
    WATTPROXY,
    ServedProcess,
    base_config,
    free_port,
    serve_process,
)
from tests.helpers.through_proxy import CHAT, final_record

pytestmark = pytest.mark.timeout(120)


def workers_config(upstream_url: str, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    doc = base_config(upstream_url, tmp_path, **sections)
    doc["listen"] = {"port": free_port(), "workers": 2, **sections.get("listen", {})}
    return doc


@contextlib.asynccontextmanager
async def serve_workers(doc: dict[str, Any], tmp_path: Path) -> AsyncIterator[ServedProcess]:
    """``serve_process``, once every worker serves (the accounting process says so; before,
    the first worker up takes every connection)."""
    async with serve_process(doc, tmp_path) as served:

        async def listening() -> bool:
            return "with 2 workers" in served.output()

        await wait_until(listening, "every worker serving")
        yield served


def worker_pids(served: ServedProcess) -> list[int]:
    """The accounting process's children: its workers."""
    pid = served.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def wait_until(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.05)


async def scrape(base: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        return await r.text()


async def metric(base: str, name: str, having: str = "") -> float:
    """The sum of the samples of ``name`` on /metrics (those whose line has ``having``)."""
    return sample_sum(await scrape(base), name, having)


def sample_sum(text: str, name: str, having: str = "") -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if (line.startswith(name + "{") or line.startswith(name + " ")) and having in line
    )


def ledger_ids(path: Path) -> list[str]:
    """Every request id in the SQLite ledger, as many times as it is there."""
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT request_id FROM records")]


async def ledger_record(path: Path, rid: str) -> RequestRecord:
    ledger = SQLiteLedger(str(path))
    await ledger.open()
    try:
        rec = await ledger.get(rid)
    finally:
        await ledger.close()
    assert rec is not None, rid
    return rec


async def chat(base: str, body: dict[str, Any] | None = None) -> tuple[int, str, bytes]:
    """One request on its own connection (so the kernel spreads them over the workers)."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(base + "/v1/chat/completions", json=body or CHAT) as r,
    ):
        return r.status, r.headers.get("X-Request-Id", ""), await r.read()


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(StandIn(flavor="vllm", scale=0.05).app())
    return server


async def test_two_workers_share_the_port_and_every_joule_is_counted_once(
    upstream: TestServer, tmp_path: Path
) -> None:
    doc = workers_config(url_of(upstream), tmp_path)
    async with serve_workers(doc, tmp_path) as served:
        assert len(worker_pids(served)) == 2
        bodies = [CHAT, {**CHAT, "stream": True}, {**CHAT, "max_tokens": 4}]
        results = await asyncio.gather(*(chat(served.base, bodies[i % 3]) for i in range(30)))
        assert all(status == 200 for status, _, _ in results)
        records = [await final_record(served.base, rid, 20.0) for _, rid, _ in results]
        # both workers served, one accounting process holds every record
        assert {r["worker"] for r in records} == {0, 1}
        assert all(r["source"] == "measured" and r["energy_j"] > 0 for r in records)
        assert all(r["completion_tokens"] for r in records)
        # conservation: what the device drew = what requests were charged + unattributed
        text = await scrape(served.base)  # one scrape: the meter goes on sampling
        device_j = sample_sum(text, "wattproxy_device_energy_joules_total")
        attributed_j = sample_sum(text, "wattproxy_attributed_energy_joules_total")
        unattributed_j = sample_sum(text, "wattproxy_unattributed_energy_joules_total")
        assert device_j > 0
        assert attributed_j + unattributed_j == pytest.approx(device_j, rel=1e-9)
        charged_j = sample_sum(text, "wattproxy_energy_joules_total")
        assert charged_j == pytest.approx(attributed_j, rel=1e-6)
        assert charged_j == pytest.approx(sum(r["energy_j"] for r in records), rel=1e-3)
        assert await metric(served.base, "wattproxy_requests_total") == 30
    assert served.proc.returncode == 0, served.output()
    assert sorted(ledger_ids(tmp_path / "ledger.db")) == sorted(rid for _, rid, _ in results)
    assert "Traceback" not in served.output()


async def test_a_record_is_provisional_while_its_stream_runs_then_final(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    up = await aiohttp_server(StandIn(flavor="vllm", scale=5.0).app())  # ~60 ms per token
    doc = workers_config(url_of(up), tmp_path)
    async with serve_workers(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        resp = await s.post(
            served.base + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 24}
        )
        rid = resp.headers["X-Request-Id"]
        await resp.content.readuntil(b"\n\n")
        await asyncio.sleep(0.3)
        async with s.get(f"{served.base}/v1/emissions/requests/{rid}") as r:
            assert r.status == 200
            doc_now = await r.json()
        assert doc_now["final"] is False
        await resp.read()
        resp.release()
        final = await final_record(served.base, rid, 20.0)
        assert final["final"] is True and final["completion_tokens"] == 24
        assert final["energy_j"] >= doc_now["energy_j"]


async def test_a_killed_worker_is_restarted_and_its_requests_end_as_proxy_restart(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    up = await aiohttp_server(StandIn(flavor="vllm", scale=10.0).app())  # ~120 ms per token
    doc = workers_config(url_of(up), tmp_path)
    async with serve_workers(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        before = worker_pids(served)
        resp = await s.post(
            served.base + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 60}
        )
        rid = resp.headers["X-Request-Id"]
        await resp.content.readuntil(b"\n\n")
        for pid in before:  # whichever serves the stream
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(aiohttp.ClientError):
            await resp.read()
        resp.release()

        async def restarted() -> bool:
            pids = worker_pids(served)
            return len(pids) == 2 and not set(pids) & set(before)

        await wait_until(restarted, "both workers started again")
        await wait_until(
            lambda: _healthy(served.base), "the new workers answer"
        )  # the port is served again
        record = await final_record(served.base, rid, 20.0)
        assert record["outcome"] == "proxy_restart"
        assert record["completion_tokens"] is None or record["completion_tokens"] < 60
        assert await metric(served.base, "wattproxy_worker_restarts_total") == 2
        status, rid2, _ = await chat(served.base)
        assert status == 200
        await final_record(served.base, rid2, 20.0)
        # the stream counted once, as proxy_restart
        restarted = await metric(
            served.base, "wattproxy_request_outcomes_total", 'outcome="proxy_restart"'
        )
        assert restarted == 1
    assert served.proc.returncode == 0, served.output()
    assert "proxy_restart" in served.output()
    ids = ledger_ids(tmp_path / "ledger.db")
    assert sorted(ids) == sorted({rid, rid2})  # each once: nothing counted twice


async def _healthy(base: str) -> bool:
    """A worker answers on a fresh connection (``/healthz``: no request record)."""
    try:
        async with aiohttp.ClientSession() as s, s.get(base + "/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def test_sighup_to_the_accounting_process_reloads_every_worker(
    upstream: TestServer, aiohttp_server: Any, tmp_path: Path
) -> None:
    new_up = await aiohttp_server(StandIn(flavor="vllm", scale=0.0).app())
    doc = workers_config(url_of(upstream), tmp_path)
    doc["upstreams"] = [{"name": "old", "url": url_of(upstream), "models": ["m"]}]
    async with serve_workers(doc, tmp_path) as served:
        body = {**CHAT, "model": "new-model"}
        status, _, _ = await chat(served.base, body)
        assert status == 404
        doc["upstreams"].append({"name": "new", "url": url_of(new_up), "models": ["new-*"]})
        served.config_path.write_text(yaml.safe_dump(doc))
        served.proc.send_signal(signal.SIGHUP)

        async def all_reloaded() -> bool:
            return served.output().count("reloaded ") >= 3  # accounting process + 2 workers

        await wait_until(all_reloaded, "every process reloaded")
        results = await asyncio.gather(*(chat(served.base, body) for _ in range(20)))
        assert [status for status, _, _ in results] == [200] * 20
        records = [await final_record(served.base, rid, 20.0) for _, rid, _ in results]
        assert {r["worker"] for r in records} == {0, 1}  # both workers took the new upstream
        assert {r["upstream"] for r in records} == {"new"}


async def test_sigterm_drains_every_worker_and_flushes_the_ledger(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    up = await aiohttp_server(StandIn(flavor="vllm", scale=10.0).app())
    doc = workers_config(url_of(up), tmp_path, listen={"shutdown_grace_s": 15})
    async with serve_workers(doc, tmp_path) as served, aiohttp.ClientSession() as s:
        streams = [
            await s.post(
                served.base + "/v1/chat/completions",
                json={**CHAT, "stream": True, "max_tokens": 12},
            )
            for _ in range(4)
        ]
        rids = [r.headers["X-Request-Id"] for r in streams]
        for r in streams:
            await r.content.readuntil(b"\n\n")
        served.proc.send_signal(signal.SIGTERM)
        for r in streams:
            rest = await r.read()
            r.release()
            assert rest.endswith(b"data: [DONE]\n\n")
        rc = await asyncio.to_thread(served.proc.wait, 40)
    assert rc == 0, served.output()
    assert "Traceback" not in served.output()
    for rid in rids:
        rec = await ledger_record(tmp_path / "ledger.db", rid)
        assert rec.outcome == "ok" and rec.completion_tokens == 12 and rec.final is True
    assert not (tmp_path / "spool.jsonl").exists()


async def test_budgets_hold_across_workers(upstream: TestServer, tmp_path: Path) -> None:
    doc = workers_config(
        url_of(upstream),
        tmp_path,
        budgets={"users": {"anonymous": {"grams_per_day": 0}}, "cache_s": 0},
    )
    async with serve_workers(doc, tmp_path) as served:
        results = await asyncio.gather(*(chat(served.base) for _ in range(10)))
        assert [status for status, _, _ in results] == [429] * 10
        body = yaml.safe_load(results[0][2])
        assert body["error"]["type"] == "carbon_budget_exceeded"
        assert body["error"]["scope"] == "user"

        async def counted() -> bool:  # a worker's events reach the accounting process in ~5 ms
            return await metric(served.base, "wattproxy_budget_rejections_total") == 10

        await wait_until(counted, "ten rejections counted")
        await asyncio.sleep(0.2)
        assert await metric(served.base, "wattproxy_budget_rejections_total") == 10


async def test_workers_stop_when_the_accounting_process_is_gone(
    upstream: TestServer, tmp_path: Path
) -> None:
    """SIGKILL to the accounting process: its workers see their event socket close and exit,
    freeing the port, rather than serve requests nobody accounts for."""
    doc = workers_config(url_of(upstream), tmp_path)
    async with serve_workers(doc, tmp_path) as served:
        pids = worker_pids(served)
        served.proc.kill()
        served.proc.wait(10)

        async def all_gone() -> bool:
            return not any(os.path.exists(f"/proc/{pid}/status") and _alive(pid) for pid in pids)

        await wait_until(all_gone, "the workers exited")
        with pytest.raises(aiohttp.ClientConnectionError):
            await chat(served.base)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent's reaper."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


async def test_a_worker_that_cannot_serve_is_a_clear_error_not_a_restart_loop(
    upstream: TestServer, tmp_path: Path
) -> None:
    """A certificate the workers cannot load (the file is there, its content is not PEM):
    serve exits 1 at once, naming the worker and why, with no traceback."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    doc = workers_config(url_of(upstream), tmp_path)
    doc["listen"]["tls"] = {"cert_file": str(bad), "key_file": str(bad)}
    path = tmp_path / "wattproxy.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = await asyncio.create_subprocess_exec(
        *WATTPROXY,
        "serve",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 1, text
    assert "listen.workers: worker" in text and "before serving" in text
    assert "cannot serve" in text
    assert "Traceback" not in text


async def test_metrics_on_their_own_listener_with_workers(
    upstream: TestServer, tmp_path: Path
) -> None:
    """``listen.metrics_port``: the accounting process serves /metrics there (every worker's
    requests in it); on the main port the path is proxied like any other, as with one process."""
    metrics_port = free_port()
    doc = workers_config(url_of(upstream), tmp_path, listen={"metrics_port": metrics_port})
    async with serve_workers(doc, tmp_path) as served:
        results = await asyncio.gather(*(chat(served.base) for _ in range(6)))
        for _, rid, _ in results:
            await final_record(served.base, rid, 20.0)
        text = await scrape(f"http://127.0.0.1:{metrics_port}")
        assert sample_sum(text, "wattproxy_requests_total") == 6
        async with aiohttp.ClientSession() as s, s.get(served.base + "/metrics") as r:
            assert r.status == 404  # the stand-in upstream has no /metrics
            assert r.headers["X-Wattproxy-Task"] == "other"  # it went through the proxy


async def test_a_burst_over_two_workers_overshoots_a_budget_by_at_most_one_request(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """Forty requests at once over both workers, each held at the upstream until all arrived:
    the accounting process admits them against one set of reservations, as one process does
    (at most one request's estimate past the budget); what they were charged is in the
    ledger."""
    gate = Gate()
    up = await aiohttp_server(gated_app(StandIn(flavor="vllm", scale=0.0), gate))
    budget_g = 2.5 * request_g()
    doc = budget_config(url_of(up), tmp_path, budget_g).model_dump(mode="json")
    doc["listen"] = {"host": "127.0.0.1", "port": free_port(), "workers": 2}
    async with serve_workers(doc, tmp_path) as served:
        statuses = await burst([served.base], 40, gate)
        admitted = statuses.count(200)
        assert admitted + statuses.count(429) == 40
        assert 1 <= admitted <= 3  # 2.5 requests: the third may be the one overshoot
        assert admitted == gate.arrived
    used_g = sum_ledger_co2e(tmp_path / "ledger.db")
    assert used_g == pytest.approx(admitted * request_g())
    assert used_g <= budget_g + request_g() * (1 + 1e-9)


def sum_ledger_co2e(path: Path) -> float:
    """Grams CO2e of every record in the SQLite ledger (each record is a JSON document)."""
    with sqlite3.connect(path) as db:
        return sum(json.loads(doc)["co2e_g"] for (doc,) in db.execute("SELECT doc FROM records"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (8, 8), ("2", 2), ("auto", "auto"), (" Auto ", "auto")],
)
def test_listen_workers_takes_a_count_or_auto(value: Any, expected: Any) -> None:
    assert parse_config({"listen": {"workers": value}}).listen.workers == expected


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "x", "", None])
def test_listen_workers_refuses_anything_else_naming_the_key(value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"listen": {"workers": value}})
    assert any("listen.workers: must be a count >= 1, or auto" in p for p in err.value.problems), (
        err.value.problems
    )


def test_serve_workers_flag_is_checked_before_anything_starts(tmp_path: Path) -> None:
    done = subprocess.run(
        [*WATTPROXY, "serve", "--workers", "many"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == 2
    assert "argument --workers: must be a count >= 1, or auto (got 'many')" in done.stderr
    assert "Traceback" not in done.stderr


async def test_workers_answer_503_while_the_accounting_process_is_behind(
    upstream: TestServer, tmp_path: Path
) -> None:
    """The accounting process stopped (SIGSTOP): the workers' events pile up; past
    ``listen.max_event_backlog_bytes`` new requests get 503 ``overloaded_error`` instead of
    being served unaccounted or held without bound. Once it runs again they are served, and
    every request that was served is in the ledger."""
    doc = workers_config(url_of(upstream), tmp_path, listen={"max_event_backlog_bytes": 65536})
    served_ids: list[str] = []
    refused: list[dict[str, Any]] = []
    refusals = 0
    async with serve_workers(doc, tmp_path) as served, aiohttp.ClientSession() as s:

        async def one() -> None:
            async with s.post(served.base + "/v1/chat/completions", json=CHAT) as r:
                body = await r.read()
                if r.status == 200:
                    served_ids.append(r.headers["X-Request-Id"])
                else:
                    assert r.status == 503, body
                    refused.append(json.loads(body))
                    nonlocal refusals
                    refusals += 1

        os.kill(served.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(200):  # about 600 requests fill the socket buffers and the backlog
                await asyncio.gather(*(one() for _ in range(16)))
                if refused:
                    break
        finally:
            os.kill(served.proc.pid, signal.SIGCONT)
        assert refused, f"no 503 after {len(served_ids)} requests"
        error = refused[0]["error"]
        assert error["type"] == "overloaded_error"
        assert "listen.max_event_backlog_bytes" in error["message"]

        async def served_again() -> bool:
            before = len(served_ids)
            refused.clear()
            await one()
            return len(served_ids) > before

        await wait_until(served_again, "served again once the accounting process caught up")
        last = served_ids[-1]
        await final_record(served.base, last, 30.0)
        # each refusal counted once, by the accounting process, once it caught up

        async def counted() -> bool:
            total = await metric(served.base, "wattproxy_overloaded_requests_total")
            return total == refusals

        await wait_until(counted, "the refusals counted")
    assert served.proc.returncode == 0, served.output()
    assert sorted(ledger_ids(tmp_path / "ledger.db")) == sorted(served_ids)
