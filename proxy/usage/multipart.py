"""A multipart/form-data upload observed as it streams through the proxy, never held whole: the
first audio file's duration (when it is WAV) and the small text fields (``model``, ...).

Pure and incremental: ``feed`` takes the body's chunks in order; memory is bounded by one chunk
plus the delimiter and one part's headers.
"""

from __future__ import annotations

import re

from proxy.usage.audio import WavProbe
from proxy.usage.base import Usage

#: Headers of one part larger than this end the inspection (the body still streams through).
MAX_PART_HEADER_BYTES = 16 * 1024
#: Text fields kept (their first bytes), and how many.
MAX_FIELD_BYTES = 1024
MAX_FIELDS = 32

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,200})"|([^;\s]{1,200}))', re.IGNORECASE)
_PARAM = re.compile(rb'\b(name|filename)\*?="?([^";\r\n]*)"?', re.IGNORECASE)

_PREAMBLE, _AFTER_DELIM, _HEADERS, _BODY, _END = range(5)


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type header, else None."""
    if not content_type.lower().lstrip().startswith("multipart/form-data"):
        return None
    m = _BOUNDARY.search(content_type)
    if m is None:
        return None
    return (m.group(1) or m.group(2)).encode("latin-1")


class MultipartUpload:
    """Follows the parts of a multipart body; see the module docstring."""

    def __init__(self, boundary: bytes) -> None:
        self._delim = b"--" + boundary
        self._sep = b"\r\n" + self._delim
        self._state = _PREAMBLE
        self._buf = b""
        self._part_is_file = False
        self._part_name: str | None = None
        self._field = bytearray()
        self.fields: dict[str, str] = {}
        self.files = 0
        self.body_bytes = 0
        self.max_buffered = 0
        self.wav: WavProbe | None = None
        self._wav_part = False

    def feed(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        if self._state == _END:
            return
        buf = self._buf + chunk if self._buf else chunk
        while True:
            if self._state == _PREAMBLE:
                i = buf.find(self._delim)
                if i < 0:
                    buf = buf[-(len(self._delim) - 1) :]
                    break
                buf = buf[i + len(self._delim) :]
                self._state = _AFTER_DELIM
            elif self._state == _AFTER_DELIM:
                if len(buf) < 2:
                    break
                if buf.startswith(b"--"):
                    self._state = _END
                    buf = b""
                    break
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_PART_HEADER_BYTES:
                        self._state, buf = _END, b""
                    break
                buf = buf[eol + 2 :]
                self._state = _HEADERS
            elif self._state == _HEADERS:
                if buf.startswith(b"\r\n"):
                    end, skip = 0, 2
                else:
                    end, skip = buf.find(b"\r\n\r\n"), 4
                if end < 0:
                    if len(buf) > MAX_PART_HEADER_BYTES:
                        self._state, buf = _END, b""
                    break
                self._start_part(buf[:end])
                buf = buf[end + skip :]
                self._state = _BODY
            else:  # _BODY
                i = buf.find(self._sep)
                if i >= 0:
                    self._content(buf[:i])
                    self._end_part()
                    buf = buf[i + len(self._sep) :]
                    self._state = _AFTER_DELIM
                    continue
                keep = len(self._sep) - 1
                if len(buf) > keep:
                    self._content(buf[: len(buf) - keep])
                    buf = buf[len(buf) - keep :]
                break
        self._buf = bytes(buf)
        self.max_buffered = max(self.max_buffered, len(self._buf))

    def _start_part(self, raw: bytes) -> None:
        name: str | None = None
        filename: str | None = None
        ctype = b""
        for line in raw.split(b"\r\n"):
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-disposition":
                for m in _PARAM.finditer(value):
                    text = m.group(2).decode("utf-8", "replace")
                    if m.group(1).lower() == b"name":
                        name = text
                    else:
                        filename = text
            elif key == b"content-type":
                ctype = value.strip().lower()
        self._part_name = name
        self._part_is_file = filename is not None or (
            bool(ctype) and not ctype.startswith(b"text/plain")
        )
        self._field = bytearray()
        self._wav_part = False
        if self._part_is_file:
            self.files += 1
            if self.wav is None:
                self.wav = WavProbe()
                self._wav_part = True

    def _content(self, data: bytes) -> None:
        if not data:
            return
        if self._wav_part and self.wav is not None:
            self.wav.feed(data)
        elif not self._part_is_file and len(self._field) < MAX_FIELD_BYTES:
            self._field += data[: MAX_FIELD_BYTES - len(self._field)]

    def _end_part(self) -> None:
        if not self._part_is_file and self._part_name is not None and len(self.fields) < MAX_FIELDS:
            self.fields[self._part_name] = self._field.decode("utf-8", "replace")
        self._wav_part = False

    @property
    def audio_s(self) -> float | None:
        return self.wav.duration_s if self.wav is not None else None

    def finish(self) -> Usage:
        return Usage(audio_s=self.audio_s, model=self.fields.get("model") or None)


def upload_probe(content_type: str) -> MultipartUpload | None:
    """A probe for a request body with this Content-Type header, or None if it needs none."""
    boundary = boundary_of(content_type)
    return MultipartUpload(boundary) if boundary else None
