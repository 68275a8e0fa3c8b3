"""Real Redis for tests, on 127.0.0.1 only.

``shared_redis_url`` names the shared server on 6379 (scripts/ensure-redis.sh starts it) with a
fresh key prefix, and ``delete_prefix`` removes that prefix's keys afterwards: tests never flush
or stop the shared server. A test that stops Redis starts its own ``RedisServer`` on a free port,
with an append-only file in a temp dir so its data survive a stop and restart.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis

HOST = "127.0.0.1"
SHARED_PORT = 6379
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def answers(port: int, host: str = HOST) -> bool:
    """True when a Redis server answers PING on host:port."""
    client = redis.Redis(host=host, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def shared_redis_available() -> bool:
    return answers(SHARED_PORT)


def new_prefix() -> str:
    return f"wptest-{uuid.uuid4().hex[:12]}"


def shared_redis_url(prefix: str, db: int = 0) -> str:
    return f"redis://{HOST}:{SHARED_PORT}/{db}?key_prefix={prefix}"


def delete_prefix(prefix: str, port: int = SHARED_PORT, db: int = 0) -> int:
    """Delete every key under ``prefix:`` (only those); returns how many."""
    client = redis.Redis(host=HOST, port=port, db=db, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        return len(keys)
    finally:
        client.close()


def count_prefix(prefix: str, port: int = SHARED_PORT, db: int = 0) -> int:
    client = redis.Redis(host=HOST, port=port, db=db, socket_timeout=5)
    try:
        return sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        client.close()


class RedisServer:
    """A private ``redis-server`` on a free loopback port; ``stop`` and ``start`` keep its data
    (append-only file, fsync always)."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                HOST,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.data_dir),
                "--daemonize",
                "no",
                "--logfile",
                str(self.data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.data_dir / 'redis.log'}")
            if answers(self.port):
                return
            time.sleep(POLL_S)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {HOST}:{self.port}")

    def stop(self) -> None:
        """SIGTERM this server (its own process only) and wait until it is gone."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
