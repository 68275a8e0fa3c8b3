"""A local append-only spool: final records wait here while the ledger backend is down or slow.

One JSON object per line (the record, with its figures at full precision), appended a batch at a
time and fsync'd once per batch, so a record the writer has spooled survives a crash or restart.
Replay reads the file from the last replayed offset in batches; the ledger skips request ids it
already has, so replaying a batch twice (after a partial failure or a crash) counts nothing
twice. After a complete replay the file is removed. The file never grows past ``max_bytes``:
records that do not fit stay with the caller.

Blocking file I/O: call these methods from a worker thread (``asyncio.to_thread``); one writer
task owns a spool, so they take no lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Generator, Sequence
from pathlib import Path

from proxy.records import RequestRecord

log = logging.getLogger("wattproxy.ledger.spool")

#: Bytes read at a time when scanning the file at startup.
SCAN_CHUNK_BYTES = 1 << 20


def encode(record: RequestRecord) -> bytes:
    """One spool line; energy and CO2e keep every digit (``to_dict`` rounds them)."""
    doc = record.to_dict()
    doc["energy_j"] = record.energy_j
    doc["co2e_g"] = record.co2e_g
    return json.dumps(doc, separators=(",", ":")).encode("utf-8") + b"\n"


def decode(line: bytes) -> RequestRecord:
    """Raises ValueError (or TypeError) for a line that is not a record."""
    doc = json.loads(line)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return RequestRecord.from_dict(doc)


class Spool:
    """Records on disk, oldest first.

    Args:
        path: the spool file; created on first append, removed after a complete replay.
        max_bytes: the file's size limit in bytes.
    """

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self.records = 0
        #: bytes already replayed to the ledger (in this process; a restart replays from 0)
        self.replayed_bytes = 0
        self.replayed_records = 0
        self.skipped_lines = 0
        self._scan()

    @property
    def pending(self) -> int:
        """Records in the file not yet replayed."""
        return self.records - self.replayed_records

    def _scan(self) -> None:
        """Count the records a previous run left, and cut a torn last line (a crash mid-append:
        the records of that append were never acknowledged as spooled)."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        lines = 0
        good_end = 0
        offset = 0
        with f:
            while chunk := f.read(SCAN_CHUNK_BYTES):
                lines += chunk.count(b"\n")
                last = chunk.rfind(b"\n")
                if last >= 0:
                    good_end = offset + last + 1
                offset += len(chunk)
        if offset != good_end:
            log.warning(
                "spool %s: cutting a torn last line (%d bytes)", self.path, offset - good_end
            )
            os.truncate(self.path, good_end)
        self.size_bytes = good_end
        self.records = lines
        if lines:
            log.warning("spool %s: %d records from a previous run to replay", self.path, lines)

    def append(self, records: Sequence[RequestRecord]) -> int:
        """Append what fits under ``max_bytes``, oldest first, then fsync. Returns how many were
        appended; raises OSError when the file cannot be written (nothing is then counted)."""
        lines = []
        size = self.size_bytes
        for r in records:
            line = encode(r)
            if size + len(line) > self.max_bytes:
                break
            lines.append(line)
            size += len(line)
        if not lines:
            return 0
        new_file = not self.path.exists()
        if new_file:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            data = b"".join(lines)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            # cut what this append may have left, so the file holds whole acknowledged lines
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self.size_bytes)
            raise
        finally:
            os.close(fd)
        if new_file:
            _fsync_dir(self.path.parent)
        self.size_bytes = size
        self.records += len(lines)
        return len(lines)

    def batches(
        self, batch_size: int
    ) -> Generator[tuple[list[RequestRecord], int, int], None, None]:
        """Unreplayed records in batches: ``(records, end_offset, lines)``, where ``lines`` counts
        the lines consumed (unreadable ones included). Pass both to ``mark_replayed`` once the
        batch is in the ledger."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(self.replayed_bytes)
            batch: list[RequestRecord] = []
            lines = 0
            offset = self.replayed_bytes
            while offset < self.size_bytes:
                line = f.readline()
                if not line:
                    break
                offset += len(line)
                lines += 1
                try:
                    batch.append(decode(line))
                except (ValueError, TypeError) as e:
                    self.skipped_lines += 1
                    log.error(
                        "spool %s: skipping an unreadable line at %d: %s", self.path, offset, e
                    )
                if len(batch) >= batch_size:
                    yield batch, offset, lines
                    batch, lines = [], 0
            if batch or lines:
                yield batch, offset, lines

    def mark_replayed(self, end_offset: int, lines: int) -> None:
        self.replayed_bytes = end_offset
        self.replayed_records += lines

    def clear(self) -> None:
        """Remove the file: every record in it is in the ledger."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _fsync_dir(self.path.parent)
        self.size_bytes = 0
        self.records = 0
        self.replayed_bytes = 0
        self.replayed_records = 0


def _fsync_dir(path: Path) -> None:
    """Make a file's creation or removal durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
