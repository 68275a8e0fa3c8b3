"""Audio length from the bytes of a WAV file as they stream past: the RIFF header gives the byte
rate, the ``data`` chunk gives the sample bytes. Pure and incremental; only the header is kept.
"""

from __future__ import annotations

from proxy.usage.base import StreamUsage, Usage

#: Bytes of a WAV file's start kept while looking for its ``fmt `` and ``data`` chunks.
MAX_WAV_HEADER_BYTES = 64 * 1024
#: A data size a streaming encoder writes when it does not know the length yet.
UNKNOWN_SIZES = frozenset((0, 0xFFFFFFFF))


class WavProbe:
    """Incremental reader of a WAV (RIFF or RF64) stream's duration.

    ``feed`` the file's bytes in order; ``duration_s`` is the length of the audio seen so far
    (the declared length when the whole file went past). Not a WAV file: ``duration_s`` is None.
    """

    __slots__ = (
        "_declared",
        "_ds64_data",
        "_head",
        "byte_rate",
        "data_offset",
        "failed",
        "sample_rate",
        "total_bytes",
    )

    def __init__(self) -> None:
        self._head = bytearray()
        self._declared: int | None = None
        self._ds64_data: int | None = None
        self.byte_rate: int | None = None
        self.sample_rate: int | None = None
        self.data_offset: int | None = None
        self.total_bytes = 0
        self.failed = False

    @property
    def done(self) -> bool:
        """True once the header is read (or known not to be a WAV header)."""
        return self.failed or self.data_offset is not None

    def feed(self, chunk: bytes) -> None:
        self.total_bytes += len(chunk)
        if self.done:
            return
        room = MAX_WAV_HEADER_BYTES - len(self._head)
        self._head += chunk[:room]
        self._parse()
        if self.data_offset is not None:
            self._head = bytearray()
        elif len(self._head) >= MAX_WAV_HEADER_BYTES:
            self.failed = True
            self._head = bytearray()

    def _parse(self) -> None:
        h = self._head
        if len(h) < 12:
            if not (b"RIFF".startswith(bytes(h[:4])) or b"RF64".startswith(bytes(h[:4]))):
                self.failed = True
            return
        if h[0:4] not in (b"RIFF", b"RF64") or h[8:12] != b"WAVE":
            self.failed = True
            return
        pos = 12
        while pos + 8 <= len(h):
            cid = bytes(h[pos : pos + 4])
            size = int.from_bytes(h[pos + 4 : pos + 8], "little")
            body = pos + 8
            if cid == b"data":
                self.data_offset = body
                self._declared = size
                if size == 0xFFFFFFFF and self._ds64_data is not None:
                    self._declared = self._ds64_data
                if self.byte_rate is None:
                    self.failed = True
                return
            if body + size > len(h):
                return  # this chunk is not whole yet
            if cid == b"fmt " and size >= 16:
                self.sample_rate = int.from_bytes(h[body + 4 : body + 8], "little")
                self.byte_rate = int.from_bytes(h[body + 8 : body + 12], "little") or None
            elif cid == b"ds64" and size >= 24:
                self._ds64_data = int.from_bytes(h[body + 8 : body + 16], "little")
            pos = body + size + (size & 1)

    @property
    def duration_s(self) -> float | None:
        if self.failed or self.data_offset is None or not self.byte_rate:
            return None
        seen = max(0, self.total_bytes - self.data_offset)
        declared = self._declared
        n = seen if declared is None or declared in UNKNOWN_SIZES else min(declared, seen)
        return n / self.byte_rate


class WavStream(StreamUsage):
    """Usage of a WAV response (text-to-speech): the seconds of audio the client received."""

    def __init__(self) -> None:
        self.tokens = 0
        self.probe = WavProbe()

    def feed(self, chunk: bytes) -> bytes:
        self.probe.feed(chunk)
        return chunk

    def finish(self) -> Usage:
        return Usage(audio_s=self.probe.duration_s)
