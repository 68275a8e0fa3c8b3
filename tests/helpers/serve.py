"""Run `wattproxy serve` as a real process for a test: write its config, start it, wait until
it answers, and always stop it (SIGTERM, then kill)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
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
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)],
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
