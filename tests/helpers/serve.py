"""Run `wattproxy serve` as a real process for a test: write its config, start it, wait until
it answers, and always stop it (SIGTERM, then kill). ``wattproxy_serve`` collects the output at
the end; ``serve_process`` writes it to a file readable while the process runs and can wait for
a TLS listener."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).parent.parent.parent
#: The ``wattproxy`` command, run from this checkout.
WATTPROXY = [sys.executable, "-m", "proxy.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(session: aiohttp.ClientSession, url: str, timeout_s: float = 30) -> None:
    """Poll ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up in {timeout_s} s"
        await asyncio.sleep(0.1)


@dataclass
class Served:
    base: str
    config_path: Path
    proc: subprocess.Popen[str]
    output: str = field(default="")


@contextlib.asynccontextmanager
async def wattproxy_serve(cfg: dict[str, Any], tmp_path: Path) -> AsyncIterator[Served]:
    """Serve ``cfg`` (its ``listen.port`` is set to a free one) until the block ends; the
    process's output is in ``served.output`` afterwards."""
    port = free_port()
    cfg = {**cfg, "listen": {**cfg.get("listen", {}), "port": port}}
    path = tmp_path / "wattproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [*WATTPROXY, "serve", "--config", str(path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    served = Served(f"http://127.0.0.1:{port}", path, proc)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_http(session, served.base + "/healthz")
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            served.output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            served.output, _ = proc.communicate()


@dataclass
class ServedProcess:
    """A ``wattproxy serve`` process whose output goes to a file."""

    proc: subprocess.Popen[bytes]
    port: int
    config_path: Path
    log_path: Path
    scheme: str = "http"

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"wattproxy did not exit in {timeout_s} s:\n{self.output()}"
            ) from None


def base_config(upstream_url: str, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "upstreams": [{"name": "llm", "url": upstream_url}],
        "meter": {"kind": "simulated", "interval_ms": 20},
        "ledger": {
            "url": f"sqlite:///{tmp_path / 'ledger.db'}",
            "flush_interval_ms": 50,
            "spool_path": str(tmp_path / "spool.jsonl"),
        },
    }
    doc.update(sections)
    return doc


@contextlib.asynccontextmanager
async def serve_process(
    doc: dict[str, Any],
    tmp_path: Path,
    env: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ServedProcess]:
    """``wattproxy serve --config`` in a subprocess, up and answering /healthz; SIGTERM after.
    Unlike ``wattproxy_serve``, its output goes to a file that can be read while it runs
    (reload messages) and it can wait for a TLS listener."""
    config_path = tmp_path / "wattproxy.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*WATTPROXY, "serve", "--config", str(config_path)],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
    served = ServedProcess(
        proc,
        int(doc["listen"]["port"]),
        config_path,
        log_path,
        "https" if ssl_context is not None else "http",
    )
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while True:
                assert proc.poll() is None, f"serve exited:\n{served.output()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(served.base + "/healthz", ssl=ssl_context or False) as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, f"serve did not come up:\n{served.output()}"
                await asyncio.sleep(0.05)
        yield served
    finally:
        if proc.poll() is None:
            with contextlib.suppress(AssertionError):
                served.stop()


async def final_record(s: aiohttp.ClientSession, base: str, rid: str) -> dict[str, Any]:
    """The request's record once final (bounded wait, not a timed assertion)."""
    deadline = time.monotonic() + 30
    while True:
        async with s.get(f"{base}/v1/emissions/requests/{rid}") as r:
            doc: dict[str, Any] = await r.json()
        if r.status == 200 and doc["final"]:
            return doc
        assert time.monotonic() < deadline, f"record {rid} never became final: {doc}"
        await asyncio.sleep(0.05)
