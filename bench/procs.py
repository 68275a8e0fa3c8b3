"""Server processes for the benchmarks: start (pinned to a CPU, with a raised open-file limit),
wait until they answer, read their RSS and CPU time from /proc, and stop them."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from estimators.units import parse_count

HOST = "127.0.0.1"
#: Open files each server asks for: 10,000 streams through a proxy need two sockets each. A
#: process without CAP_SYS_RESOURCE cannot pass its hard limit, so this is a wish.
NOFILE = 65536
#: Seconds a server gets to answer its readiness URL.
READY_TIMEOUT_S = 90.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, NOFILE), max(hard, NOFILE)))


def pin_prefix(cpus: str | None) -> list[str]:
    """``taskset -c CPUS`` when pinning is on and taskset exists."""
    if cpus is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpus]


@dataclass
class Server:
    """One started server process (and, for nginx, its workers)."""

    name: str
    argv: list[str]
    ready_url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)

    def start(self, cpus: str | None, env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            pin_prefix(cpus) + self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_raise_nofile,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as resp:
                    if resp.status < 500:
                        self.pids = [self.proc.pid, *children(self.proc.pid)]
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer {self.ready_url}: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def cpu_s(self) -> float:
        """User plus system CPU seconds of the process and its workers."""
        return sum(cpu_s(pid) for pid in self.pids)

    def rss_bytes(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    def pin(self, cpus: str | None) -> None:
        """Move every thread of the process (and its workers) to ``cpus`` ("0", "1")."""
        if cpus is None:
            return
        wanted = {int(c) for c in cpus.split(",")}
        for pid in self.pids:
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError, ValueError):
                    os.sched_setaffinity(int(task.name), wanted)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        child = parse_count(entry.name)
        if child is None:
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(child)
    return out


def cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * PAGE_BYTES


def nofile_limit(pid: int) -> int:
    """The soft open-file limit of a running process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no open-file limit in /proc/{pid}/limits")


def stop_all(servers: Sequence[Server]) -> None:
    for server in reversed(servers):
        server.stop()
