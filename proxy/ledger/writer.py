"""Writes final records to the ledger in batches, off the request path.

``submit`` never waits: it appends to a memory backlog that a background task flushes every
``flush_interval_s`` or when ``batch_size`` records are waiting. When the backend fails or takes
longer than ``write_timeout_s``, what is waiting goes to the spool on disk (when one is given) and
the writer retries with jittered backoff: first the spool is replayed, oldest first, then the
memory backlog. The ledger skips request ids it already has, so a batch that was written but not
acknowledged can be sent again: nothing is lost and nothing counted twice.

``wattproxy_ledger_backlog_records{backend}`` counts records in memory and in the spool;
``wattproxy_ledger_errors_total{backend}`` counts failed writes (``backend="spool"`` for a spool
that cannot be written).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence

from proxy.errors import LedgerError
from proxy.ledger.base import Ledger
from proxy.ledger.spool import Spool
from proxy.metrics import Metrics
from proxy.records import RequestRecord

log = logging.getLogger("wattproxy.ledger")

FLUSH_RETRY_BASE_S = 0.2  # first backoff after a failed flush
FLUSH_RETRY_CAP_S = 5.0  # longest backoff
WRITE_TIMEOUT_S = 5.0  # a batch write slower than this counts as failed (records are spooled)
#: Records kept in memory when the spool is full or absent; the oldest are dropped beyond it.
MAX_MEMORY_RECORDS = 200_000
#: Log every this many dropped records (the first one too).
DROP_LOG_EVERY = 1000


class LedgerWriter:
    """Batches final records to the ledger, through the spool while the ledger is unavailable.

    Args:
        ledger: the backend.
        metrics: metric families (ledger errors and backlog).
        batch_size: records per ledger write.
        flush_interval_s: seconds between flushes when fewer than ``batch_size`` wait.
        spool: the on-disk spool; None keeps failed records in memory only.
        write_timeout_s: seconds one batch write may take before it counts as failed.
        max_memory_records: records held in memory at most (the oldest are dropped beyond).
        on_written: told of each batch the ledger has stored (budgets drop what they counted
            locally once the ledger's figure holds it).
    """

    def __init__(
        self,
        ledger: Ledger,
        metrics: Metrics,
        batch_size: int = 256,
        flush_interval_s: float = 0.5,
        spool: Spool | None = None,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        max_memory_records: int = MAX_MEMORY_RECORDS,
        on_written: Callable[[Sequence[RequestRecord]], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.spool = spool
        self.write_timeout_s = write_timeout_s
        self.max_memory_records = max_memory_records
        self.on_written = on_written
        self._memory: deque[RequestRecord] = deque()
        self._inflight = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._failures = 0
        #: records handed to the ledger successfully (replayed ones included)
        self.written = 0
        #: records ever moved to the spool
        self.spooled = 0
        #: records dropped because memory and spool were both full
        self.dropped = 0
        self._backlog_gauge = metrics.ledger_backlog.labels(ledger.backend)  # set per record
        self._set_backlog()

    @property
    def backlog(self) -> int:
        """Records not yet in the ledger: in memory, being written, and in the spool."""
        spooled = self.spool.pending if self.spool is not None else 0
        return len(self._memory) + self._inflight + spooled

    def _set_backlog(self) -> None:
        self._backlog_gauge.set(self.backlog)

    def submit(self, record: RequestRecord) -> None:
        """Queue a final record; never blocks."""
        self._memory.append(record)
        if len(self._memory) > self.max_memory_records:
            self._memory.popleft()
            self.dropped += 1
            if self.dropped % DROP_LOG_EVERY == 1:
                log.error(
                    "ledger backlog full (%d in memory, spool full or absent): %d records dropped",
                    self.max_memory_records,
                    self.dropped,
                )
        self._set_backlog()
        if len(self._memory) >= self.batch_size:
            self._wake.set()

    async def flush(self) -> bool:
        """Write everything waiting, the spool first; False if the backend failed (what was
        waiting is then in the spool, or in memory without one)."""
        async with self._lock:
            try:
                return await self._flush()
            finally:
                self._set_backlog()

    async def _flush(self) -> bool:
        if self.spool is not None and self.spool.pending and not await self._replay(self.spool):
            await self._spill([])
            return False
        while self._memory:
            batch = [self._memory.popleft() for _ in range(min(self.batch_size, len(self._memory)))]
            self._inflight = len(batch)
            try:
                ok = await self._write(batch)
            finally:
                self._inflight = 0
            if not ok:
                await self._spill(batch)
                return False
            self.written += len(batch)
            self._told(batch)
            self._set_backlog()
        return True

    def _told(self, batch: Sequence[RequestRecord]) -> None:
        if self.on_written is None:
            return
        try:
            self.on_written(batch)
        except Exception:  # a listener's bug must not stop the writer
            log.exception("on_written failed for %d records", len(batch))

    async def _write(self, batch: list[RequestRecord]) -> bool:
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await self.ledger.write(batch)
        except (LedgerError, TimeoutError) as e:
            self._failures += 1
            self.metrics.ledger_errors.labels(self.ledger.backend).inc()
            reason = str(e) or f"no answer within {self.write_timeout_s} s"
            log.warning("ledger write of %d records failed: %s", len(batch), reason)
            return False
        except Exception:
            # a backend that let an error through untranslated: keep the records and the writer
            self._failures += 1
            self.metrics.ledger_errors.labels(self.ledger.backend).inc()
            log.exception("ledger write of %d records failed unexpectedly", len(batch))
            return False
        self._failures = 0
        return True

    async def _replay(self, spool: Spool) -> bool:
        """Send the spool to the ledger, batch by batch; remove it once all of it is there."""
        replayed = 0
        batches = spool.batches(self.batch_size)
        try:
            while (item := await asyncio.to_thread(next, batches, None)) is not None:
                records, end_offset, lines = item
                if records and not await self._write(records):
                    return False
                spool.mark_replayed(end_offset, lines)
                replayed += len(records)
                self.written += len(records)
                self._told(records)
                self._set_backlog()
        except OSError as e:
            self.metrics.ledger_errors.labels("spool").inc()
            log.error("cannot read the spool %s: %s", spool.path, e)
            return False
        finally:
            with contextlib.suppress(ValueError):  # still running in a thread when cancelled
                batches.close()
        try:
            await asyncio.to_thread(spool.clear)
        except OSError as e:
            log.error("cannot remove the replayed spool %s: %s", spool.path, e)
        log.info("ledger is back: %d spooled records replayed", replayed)
        return True

    async def _spill(self, batch: list[RequestRecord]) -> None:
        """Move a failed batch and the memory backlog to the spool (whatever fits); the rest
        goes back to the front of the memory backlog, in order."""
        records = batch + list(self._memory)
        self._memory.clear()
        taken = 0
        if self.spool is not None and records:
            try:
                taken = await asyncio.to_thread(self.spool.append, records)
            except OSError as e:
                self.metrics.ledger_errors.labels("spool").inc()
                log.error("cannot write the spool %s: %s", self.spool.path, e)
            if taken < len(records):
                log.warning(
                    "spool %s is full (%d bytes): %d records kept in memory",
                    self.spool.path,
                    self.spool.max_bytes,
                    len(records) - taken,
                )
        self.spooled += taken
        self._memory.extendleft(reversed(records[taken:]))
        over = len(self._memory) - self.max_memory_records
        if over > 0:
            for _ in range(over):
                self._memory.popleft()
            self.dropped += over
            log.error("ledger backlog full: %d oldest records dropped", over)
        self._set_backlog()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if not await self.flush():
                delay = min(FLUSH_RETRY_CAP_S, FLUSH_RETRY_BASE_S * 2 ** min(self._failures, 10))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
