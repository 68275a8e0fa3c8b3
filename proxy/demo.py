"""``wattproxy demo``: the whole pipeline on one machine with no GPU.

A stand-in inference server answers the tasks of "Power Hungry Processing", the proxy meters it
with a simulated GPU, three users send a mixed load, and the per-task and per-user tables are
printed beside the paper's means.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from estimators.priors import KWH_PER_1000, prior_task
from estimators.units import J_PER_KWH
from proxy.app import PARTS, create_app
from proxy.config import parse_config
from proxy.reports import build_report, equivalents, group, report_table
from proxy.standins import StandIn

USERS = {"alice": "research", "bob": "research", "carol": "product"}

#: model prefix -> (upstream name, task, path override)
MODELS: dict[str, tuple[str, str, dict[str, str]]] = {
    "llama-": ("llm", "text-generation", {}),
    "bart-": ("summarizer", "summarization", {"/v1/completions": "summarization"}),
    "blip-": ("captioner", "image-to-text", {"/v1/chat/completions": "image-to-text"}),
    "distilbert-": ("classifier", "text-classification", {}),
    "bge-": ("embedder", "feature-extraction", {}),
    "sd-": ("diffusion", "text-to-image", {}),
}

TEXT = [
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "the",
    "grid",
    "runs",
    "on",
    "wind",
    "and",
    "sun",
    "and",
    "the",
    "accelerator",
    "draws",
    "its",
    "watts",
    "one",
    "token",
    "at",
    "a",
    "time",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(upstream_url: str, out: Path, port: int) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstreams": [
            {
                "name": name,
                "url": upstream_url,
                "models": [prefix + "*"],
                "tasks": tasks,
                "devices": ["gpu0"],
            }
            for prefix, (name, _task, tasks) in MODELS.items()
        ],
        "meter": {"kind": "simulated", "interval_ms": 50},
        "attribution": {"idle": "exclude", "idle_watts": 60, "weighting": "work"},
        "carbon": {"zone": "WORLD", "pue": 1.2},
        "ledger": {"url": f"sqlite:///{out / 'wattproxy.db'}", "flush_interval_ms": 100},
        "identity": {"keys_file": str(out / "keys.yaml")},
    }


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(TEXT) for _ in range(n))


def make_request(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    """(task, path, body) of one request of a realistic mix."""
    task = rng.choices(
        [
            "text-generation",
            "summarization",
            "image-to-text",
            "text-classification",
            "feature-extraction",
            "text-to-image",
        ],
        weights=[30, 10, 8, 25, 22, 5],
    )[0]
    if task == "text-generation":
        body = {
            "model": "llama-3.1-8b",
            "messages": [{"role": "user", "content": _words(rng, 40)}],
            "max_tokens": rng.randint(16, 48),
            "stream": rng.random() < 0.7,
        }
        return task, "/v1/chat/completions", body
    if task == "summarization":
        body = {"model": "bart-large-cnn", "prompt": _words(rng, 200), "max_tokens": 30}
        return task, "/v1/completions", body
    if task == "image-to-text":
        content = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "Describe the image."},
        ]
        body = {
            "model": "blip-image-captioning",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 20,
        }
        return task, "/v1/chat/completions", body
    if task == "text-classification":
        return task, "/classify", {"model": "distilbert-sst2", "input": _words(rng, 30)}
    if task == "feature-extraction":
        return task, "/v1/embeddings", {"model": "bge-small-en", "input": _words(rng, 60)}
    return (
        task,
        "/v1/images/generations",
        {"model": "sd-turbo", "prompt": _words(rng, 12), "n": 1, "num_inference_steps": 20},
    )


class Progress:
    def __init__(self, total: int, stream: Any = sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def step(self) -> None:
        self.done += 1
        if not self.tty and self.done not in (self.total, self.total // 2):
            return
        filled = int(30 * self.done / self.total)
        end = "\n" if self.done == self.total or not self.tty else ""
        self.stream.write(
            f"\r  [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}{end}"
        )
        self.stream.flush()


async def drive(
    base_url: str,
    requests: int,
    seed: int,
    concurrency: int = 8,
    on_done: Callable[[], None] = lambda: None,
) -> dict[str, int]:
    """Send the mixed load; returns status code counts."""
    rng = random.Random(seed)
    plan = [(rng.choice(list(USERS)), *make_request(rng)) for _ in range(requests)]
    sem = asyncio.Semaphore(concurrency)
    codes: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:

        async def one(user: str, path: str, body: dict[str, Any]) -> None:
            async with sem:
                headers = {"Authorization": f"Bearer demo-key-{user}"}
                async with session.post(base_url + path, json=body, headers=headers) as resp:
                    await resp.read()
                    codes[str(resp.status)] = codes.get(str(resp.status), 0) + 1
            on_done()

        await asyncio.gather(*(one(user, path, body) for user, _task, path, body in plan))
    return codes


def task_table(rows: list[Any], g_per_kwh: float) -> str:
    head = (
        f"{'task':<22} {'requests':>8} {'J/request':>10} {'kWh/1000':>9} "
        f"{'gCO2e/1000':>10} {'paper kWh/1000':>14}"
    )
    lines = [head, "-" * len(head)]
    for task, t in group(rows, "task"):
        per_j = t.energy_j / t.requests if t.requests else 0.0
        kwh_1000 = per_j * 1000 / J_PER_KWH
        paper = KWH_PER_1000.get(prior_task(task))
        lines.append(
            f"{task:<22} {t.requests:>8} {per_j:>10.2f} {kwh_1000:>9.4f} "
            f"{t.co2e_g / t.requests * 1000 if t.requests else 0:>10.2f} "
            f"{paper if paper is not None else float('nan'):>14.3f}"
        )
    return "\n".join(lines)


def user_table(rows: list[Any]) -> str:
    head = (
        f"{'user':<8} {'team':<10} {'requests':>8} {'energy J':>10} {'gCO2e':>9} "
        f"{'phone charges':>13}"
    )
    lines = [head, "-" * len(head)]
    for user, t in group(rows, "user"):
        lines.append(
            f"{user:<8} {USERS.get(user, ''):<10} {t.requests:>8} {t.energy_j:>10.1f} "
            f"{t.co2e_g:>9.3f} {equivalents(t.co2e_g)['smartphone_charges']:>13.3f}"
        )
    return "\n".join(lines)


async def run_demo(out: Path, requests: int = 150, seed: int = 0) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("wattproxy.db", "wattproxy.db-wal", "wattproxy.db-shm"):
        (out / name).unlink(missing_ok=True)
    keys = "keys:\n" + "".join(
        f"  - key: demo-key-{u}\n    user: {u}\n    team: {t}\n" for u, t in USERS.items()
    )
    (out / "keys.yaml").write_text(keys, "utf-8")
    started = time.monotonic()

    standin = StandIn(
        task_of_model={p: t for p, (_n, t, _o) in MODELS.items()}, keep_requests=False
    )
    up_runner = web.AppRunner(standin.app(), access_log=None)
    await up_runner.setup()
    up_port = free_port()
    await web.TCPSite(up_runner, "127.0.0.1", up_port).start()

    port = free_port()
    cfg = parse_config(demo_config(f"http://127.0.0.1:{up_port}", out, port), "demo", environ={})
    app = create_app(cfg, registry=CollectorRegistry())
    parts = app[PARTS]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(
        f"wattproxy demo: proxy on 127.0.0.1:{port} -> stand-in server on 127.0.0.1:{up_port}, "
        f"simulated GPU meter, {requests} requests from {len(USERS)} users"
    )
    progress = Progress(requests)
    try:
        codes = await drive(f"http://127.0.0.1:{port}", requests, seed, on_done=progress.step)
        deadline = time.monotonic() + 10
        while parts.accountant.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await parts.writer.flush()
        rows = await parts.ledger.aggregates("0000-01-01", "9999-12-31")
        (out / "metrics.prom").write_bytes(parts.metrics.exposition())
        totals = parts.engine.devices.get("gpu0")
    finally:
        await runner.cleanup()
        await up_runner.cleanup()

    g_per_kwh = cfg.carbon.intensity_g_per_kwh or 475.0
    print(f"\nstatus codes: {codes}")
    print(
        f"\nPer task (measured on the simulated GPU; grid {cfg.carbon.zone} "
        f"{g_per_kwh:g} g/kWh, PUE {cfg.carbon.pue}):"
    )
    print(task_table(rows, g_per_kwh))
    print("\npaper: Luccioni, Jernite, Strubell, Power Hungry Processing (2024), A100 node means.")
    print("\nPer user:")
    print(user_table(rows))
    if totals is not None:
        print(
            f"\ngpu0: measured {totals.measured_j:.1f} J = attributed {totals.attributed_j:.1f} J"
            f" + idle {totals.idle_j:.1f} J + no requests {totals.no_requests_j:.1f} J"
        )
    report = build_report(
        "alice", *_period(rows), rows=[r for r in rows if r.user == "alice"], group_by="task"
    )
    print("\n" + report_table(report))
    print(
        f"\nledger: {out / 'wattproxy.db'}   metrics: {out / 'metrics.prom'}   "
        f"({time.monotonic() - started:.1f} s)"
    )
    failed = sum(n for code, n in codes.items() if not code.startswith("2"))
    return 0 if failed == 0 and rows else 1


def _period(rows: list[Any]) -> tuple[Any, Any]:
    from datetime import date

    days = sorted(r.day for r in rows) or [date.today().isoformat()]
    return date.fromisoformat(days[0]), date.fromisoformat(days[-1])
