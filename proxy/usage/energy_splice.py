"""Energy in the answer: the request's energy figures written into the ``usage`` object the
client gets, every other byte as the upstream sent it. Pure: bytes in, bytes out.

The fields ``,"energy_j":E,"co2e_g":G,"source":"measured"|"estimated","final":false`` go just
before the closing brace of the top-level ``usage`` object of a JSON document (a non-streamed
answer, or one SSE event's data). ``UsageSplicer`` finds that brace incrementally, across
chunk boundaries, holding no bytes back: it tracks strings, escapes and nesting only, so a
``"usage"`` inside a string or deeper in the document is never touched. What it cannot find
within ``scan_limit_bytes`` (or a document that is not an object, or a ``usage`` that is not
an object) it leaves untouched.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

#: ``(energy_j, co2e_g, source)`` of a request as it stands.
Figures = tuple[float, float, str]
FiguresFn = Callable[[], Figures]
SOURCES = frozenset(("measured", "estimated"))
#: How far into a document the top-level ``usage`` is looked for (bytes); past it the rest is
#: relayed untouched. Usage comes last in the answers of every server we know.
SCAN_LIMIT_BYTES = 16 * 1024 * 1024

_OUTSIDE = re.compile(rb'["{}\[\],]')
_IN_STRING = re.compile(rb'["\\]')
_NON_WS = re.compile(rb"[^ \t\r\n]")
_KEY = b"usage"

# phases of UsageSplicer
_START, _SCAN, _COLON, _VALUE, _INSIDE, _DONE = range(6)


def number(value: float) -> bytes:
    """A figure as JSON: six significant digits (``1.23457e-05`` is valid JSON)."""
    return json.dumps(float(f"{value:.6g}")).encode()


def energy_fields(figures: Figures, first: bool = False) -> bytes | None:
    """The members to add (with their leading comma unless ``first``); None when a figure is
    not a finite number or the source is not one of ``SOURCES`` (nothing is added then)."""
    energy_j, co2e_g, source = figures
    if not (math.isfinite(energy_j) and math.isfinite(co2e_g)) or source not in SOURCES:
        return None
    body = (
        b'"energy_j":'
        + number(energy_j)
        + b',"co2e_g":'
        + number(co2e_g)
        + b',"source":"'
        + source.encode()
        + b'","final":false'
    )
    return body if first else b"," + body


class UsageSplicer:
    """Adds the energy fields to the top-level ``usage`` object of one JSON document fed in
    chunks; ``feed`` returns each chunk as it goes out (the same bytes, plus the fields in the
    chunk holding the object's closing brace). ``figures`` is called once, at that brace, so
    the figures are those of that moment.

    ``spliced`` says whether the fields went in."""

    __slots__ = (
        "_depth",
        "_empty",
        "_escape",
        "_expect_key",
        "_figures",
        "_in_string",
        "_key",
        "_phase",
        "_scanned",
        "scan_limit_bytes",
        "spliced",
    )

    def __init__(self, figures: FiguresFn, scan_limit_bytes: int = SCAN_LIMIT_BYTES) -> None:
        self._figures = figures
        self.scan_limit_bytes = scan_limit_bytes
        self._phase = _START
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._expect_key = False
        #: the raw bytes of a top-level key being read (None: not reading one)
        self._key: bytearray | None = None
        self._empty = True  # the usage object has no member so far
        self._scanned = 0
        self.spliced = False

    @property
    def done(self) -> bool:
        return self._phase == _DONE

    def feed(self, chunk: bytes) -> bytes:
        if self._phase == _DONE:
            return chunk
        self._scanned += len(chunk)
        if self._scanned > self.scan_limit_bytes:
            self._phase = _DONE
            return chunk
        at = self._find(chunk)
        if at is None:
            return chunk
        self._phase = _DONE
        fields = energy_fields(self._figures(), first=self._empty)
        if fields is None:
            return chunk
        self.spliced = True
        return chunk[:at] + fields + chunk[at:]

    def _find(self, chunk: bytes) -> int | None:
        """Scan ``chunk``; the offset of the usage object's closing brace if it is in it."""
        i, n = 0, len(chunk)
        while i < n and self._phase != _DONE:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    if self._key is not None:
                        self._key += chunk[i : i + 1]
                    i += 1
                    continue
                m = _IN_STRING.search(chunk, i)
                end = n if m is None else m.start()
                if self._key is not None and len(self._key) <= len(_KEY):
                    self._key += chunk[i:end]
                if m is None:
                    return None
                i = m.end()
                if m.group() == b"\\":
                    self._escape = True
                    if self._key is not None:
                        self._key += b"\\"
                    continue
                self._in_string = False
                if self._key is not None:
                    if self._key == _KEY:
                        self._phase = _COLON
                    self._key = None
                continue
            if self._phase in (_START, _COLON, _VALUE):
                m = _NON_WS.search(chunk, i)
                if m is None:
                    return None
                c = chunk[m.start()]
                i = m.end()
                if self._phase == _START:
                    if c != ord("{"):
                        self._phase = _DONE  # not an object: nothing to splice
                        return None
                    self._depth, self._expect_key, self._phase = 1, True, _SCAN
                elif self._phase == _COLON:
                    self._phase = _VALUE if c == ord(":") else _DONE
                elif c == ord("{"):
                    self._depth, self._empty, self._phase = 2, True, _INSIDE
                else:
                    self._phase = _DONE  # "usage": null, or not an object
                continue
            m = _OUTSIDE.search(chunk, i)
            if m is None:
                return None
            c = chunk[m.start()]
            i = m.end()
            if c == ord('"'):
                self._in_string = True
                if self._phase == _INSIDE:
                    self._empty = False
                elif self._depth == 1 and self._expect_key:
                    self._expect_key = False
                    self._key = bytearray()
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._phase == _INSIDE and self._depth == 1:
                    return m.start()
                if self._depth <= 0:
                    self._phase = _DONE  # the document ended without a usage object
            elif self._depth == 1:  # a comma between top-level members
                self._expect_key = True
        return None


def splice_usage(document: bytes, figures: Figures) -> bytes:
    """``document`` (a whole JSON object) with the fields in its top-level ``usage`` object;
    unchanged when it has none."""
    return UsageSplicer(lambda: figures).feed(document)


def splice_event(event: bytes, figures: FiguresFn) -> bytes:
    """One SSE event (a single ``data:`` line of JSON and its blank line) with the fields in
    its ``usage`` object; any other event unchanged."""
    if not event.startswith(b"data:"):
        return event
    start = 6 if event.startswith(b"data: ") else 5
    line_end = event.find(b"\n", start)
    if line_end < 0 or event[line_end:].strip():
        return event
    return event[:start] + UsageSplicer(figures).feed(event[start:])
