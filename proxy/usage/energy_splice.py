"""Energy in the answer: the request's energy figures written into the ``usage`` object the
client gets, every other byte as the upstream sent it. Pure: bytes in, bytes out.

The fields ``,"energy_j":E,"co2e_g":G,"source":"measured"|"estimated","final":false`` go just
before the closing brace of the object at a key path of a JSON document (a non-streamed
answer, one SSE event's data, one NDJSON line): the top-level ``usage`` by default,
``response.usage`` in the Responses API, TGI's ``details``, or the document itself (Ollama,
whose counts are top-level members). ``UsageSplicer`` finds that brace incrementally, across
chunk boundaries, holding no bytes back: it tracks strings, escapes and nesting only, so a key
inside a string or at another depth is never taken for the path's. What it cannot find within
``scan_limit_bytes`` (or a document that is not an object, or a value on the path that is not
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
#: Where the fields go: the keys from the document down to the object (empty: the document).
KeyPath = tuple[bytes, ...]
USAGE: KeyPath = (b"usage",)

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
    """Adds the energy fields to the object at ``path`` (the top-level ``usage`` by default) of
    one JSON document fed in chunks; ``feed`` returns each chunk as it goes out (the same
    bytes, plus the fields in the chunk holding the object's closing brace). ``figures`` is
    called once, at that brace, so the figures are those of that moment.

    ``spliced`` says whether the fields went in."""

    __slots__ = (
        "_depth",
        "_empty",
        "_escape",
        "_expect_key",
        "_figures",
        "_in_string",
        "_key",
        "_level",
        "_path",
        "_phase",
        "_scanned",
        "scan_limit_bytes",
        "spliced",
    )

    def __init__(
        self,
        figures: FiguresFn,
        scan_limit_bytes: int = SCAN_LIMIT_BYTES,
        path: KeyPath = USAGE,
    ) -> None:
        self._figures = figures
        self.scan_limit_bytes = scan_limit_bytes
        self._path = path
        self._phase = _START
        self._depth = 0
        #: how many of the path's keys were found: the object searched is at depth level + 1
        self._level = 0
        self._in_string = False
        self._escape = False
        self._expect_key = False
        #: the raw bytes of a key being read on the path (None: not reading one)
        self._key: bytearray | None = None
        self._empty = True  # the target object has no member so far
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

    def _enter(self) -> None:
        """An object on the path opened: the target, or one to search for the next key."""
        if self._level == len(self._path):
            self._empty, self._phase = True, _INSIDE
        else:
            self._expect_key, self._phase = True, _SCAN

    def _find(self, chunk: bytes) -> int | None:
        """Scan ``chunk``; the offset of the target object's closing brace if it is in it."""
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
                if self._key is not None and len(self._key) <= len(self._path[self._level]):
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
                    if self._key == self._path[self._level]:
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
                    self._depth = 1
                    self._enter()
                elif self._phase == _COLON:
                    self._phase = _VALUE if c == ord(":") else _DONE
                elif c == ord("{"):
                    self._depth += 1
                    self._level += 1
                    self._enter()
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
                elif self._expect_key and self._depth == self._level + 1:
                    self._expect_key = False
                    self._key = bytearray()
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._phase == _INSIDE and self._depth == self._level:
                    return m.start()
                if self._depth <= self._level:
                    self._phase = _DONE  # the object searched ended without the key
            elif self._depth == self._level + 1:  # a comma between the searched object's members
                self._expect_key = True
        return None


def splice_usage(document: bytes, figures: Figures, path: KeyPath = USAGE) -> bytes:
    """``document`` (a whole JSON object) with the fields in the object at ``path``;
    unchanged when it has none."""
    return UsageSplicer(lambda: figures, path=path).feed(document)


def splice_event(event: bytes, figures: FiguresFn, path: KeyPath = USAGE) -> bytes:
    """One SSE event (a single ``data:`` line of JSON, after any other fields such as a named
    event's ``event:``, and its blank line) with the fields in the object at ``path`` of its
    data; any other event unchanged."""
    at = 0 if event.startswith(b"data:") else event.find(b"\ndata:") + 1
    if at == 0 and not event.startswith(b"data:"):
        return event
    start = at + (6 if event.startswith(b"data: ", at) else 5)
    line_end = event.find(b"\n", start)
    if line_end < 0 or event[line_end:].strip():
        return event
    return event[:start] + UsageSplicer(figures, path=path).feed(event[start:])
