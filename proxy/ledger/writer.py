"""Writes final records to the ledger in batches, off the request path.

``submit`` never waits: it appends to a backlog that a background task flushes every
``flush_interval_s`` or when ``batch_size`` records are waiting. When the backend fails, the batch
stays in the backlog (and, with a spool, on disk) and is retried with jittered backoff; the
ledger's idempotent writes make the retry safe.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque

from proxy.errors import LedgerError
from proxy.ledger.base import Ledger
from proxy.metrics import Metrics
from proxy.records import RequestRecord

log = logging.getLogger("wattproxy.ledger")

RETRY_BASE_S = 0.2  # first backoff after a failed flush
RETRY_CAP_S = 10.0  # longest backoff


class LedgerWriter:
    def __init__(
        self,
        ledger: Ledger,
        metrics: Metrics,
        batch_size: int = 256,
        flush_interval_s: float = 0.5,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._backlog: deque[RequestRecord] = deque()
        self._wake = asyncio.Event()
        self._failures = 0
        self.written = 0

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def submit(self, record: RequestRecord) -> None:
        self._backlog.append(record)
        self.metrics.ledger_backlog.labels(self.ledger.backend).set(len(self._backlog))
        if len(self._backlog) >= self.batch_size:
            self._wake.set()

    async def flush(self) -> bool:
        """Write everything waiting; False if the backend failed (records stay queued)."""
        while self._backlog:
            batch = [self._backlog[i] for i in range(min(self.batch_size, len(self._backlog)))]
            try:
                await self.ledger.write(batch)
            except LedgerError as e:
                self._failures += 1
                self.metrics.ledger_errors.labels(self.ledger.backend).inc()
                log.warning("ledger write failed (%d records kept for retry): %s", len(batch), e)
                return False
            for _ in batch:
                self._backlog.popleft()
            self.written += len(batch)
            self._failures = 0
            self.metrics.ledger_backlog.labels(self.ledger.backend).set(len(self._backlog))
        return True

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if not await self.flush():
                delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(self._failures, 10))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
