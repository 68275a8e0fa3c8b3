"""Shared fixtures: a stand-in inference server and a wattproxy in front of it, both on real
loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import settings
from prometheus_client import CollectorRegistry

from estimators.meters import Meter
from proxy.app import PARTS, Parts, create_app
from proxy.config import Config, parse_config
from proxy.ledger.base import Ledger
from proxy.protocol import ProxyRunner
from proxy.standins import StandIn

# Loaded before any test module is imported, so every ``@settings(...)`` in them inherits it:
# the same examples on every run (seeded from each test), and no example database carried
# between runs. ``pytest --hypothesis-profile=explore`` hunts for new failures at random.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")


def proxy_config(upstream_url: str, tmp_path: Path, **sections: Any) -> Config:
    """A config for tests: one upstream, the simulated meter at 20 ms, a ledger in tmp_path."""
    doc: dict[str, Any] = {
        "upstreams": [{"name": "llm", "url": upstream_url}],
        "meter": {"kind": "simulated", "interval_ms": 20, "simulated_noise": 0.0},
        "attribution": {"idle_watts": 60.0},
        "ledger": {
            "url": f"sqlite:///{tmp_path / 'ledger.db'}",
            "flush_interval_ms": 20,
            "spool_path": str(tmp_path / "spool.jsonl"),
        },
    }
    doc.update(sections)
    return parse_config(doc, "test", environ={})


@pytest.fixture
def standin() -> StandIn:
    """A vLLM-flavoured stand-in with no artificial latency."""
    return StandIn(flavor="vllm", scale=0.0)


@pytest.fixture
async def upstream(aiohttp_server: Any, standin: StandIn) -> TestServer:
    server: TestServer = await aiohttp_server(standin.app())
    return server


def url_of(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


ProxyFactory = Callable[..., Awaitable[tuple[TestServer, Parts]]]


class ProxyTestServer(TestServer):
    """aiohttp's test server with the runner ``wattproxy serve`` uses (JSON parse errors)."""

    async def _make_runner(self, **kwargs: Any) -> ProxyRunner:
        assert self.app is not None
        return ProxyRunner(self.app, **kwargs)


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    """``await make_proxy(cfg, meter=..., ledger=..., environ=...)`` -> (server, parts), on a
    real port (``environ``: where ``*_env`` secrets are read, the process's by default)."""
    servers: list[TestServer] = []

    async def make(
        cfg: Config,
        meter: Meter | None = None,
        ledger: Ledger | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> tuple[TestServer, Parts]:
        app: web.Application = create_app(
            cfg, meter=meter, ledger=ledger, registry=CollectorRegistry(), environ=environ
        )
        server = ProxyTestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server, app[PARTS]

    yield make
    for server in reversed(servers):
        await server.close()
