"""The proxy as a ``Service`` in this process, with the production runner settings (timeouts,
limits), on a free port, stopped afterwards; and a ``listen`` section for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.config import Config
from proxy.server import Service

READ_TIMEOUT_S = 0.6


@contextlib.asynccontextmanager
async def running(cfg: Config, **parts_kwargs: Any) -> AsyncIterator[Service]:
    """The proxy with production runner settings, on a free port, stopped afterwards."""
    service = Service(cfg, registry=CollectorRegistry(), **parts_kwargs)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def listen(**extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": 0, "read_timeout_s": READ_TIMEOUT_S, **extra}
