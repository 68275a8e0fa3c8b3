"""Who is calling: API keys from ``identity.keys_file`` (stored as sha256), trusted gateway
headers when allowed, else ``anonymous``. A client's key never leaves this module: the rest of
the proxy sees only the user, the team and a short key id (a sha256 prefix)."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from multidict import CIMultiDictProxy

from proxy.errors import ConfigError, Unauthorized

ANONYMOUS = "anonymous"
KEY_ID_CHARS = 12
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    team: str | None = None
    key_id: str | None = None
    #: seconds this key's requests may wait for a lower-carbon window (keys file ``deferrable_s``)
    deferrable_s: float | None = None


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer(headers: CIMultiDictProxy[str]) -> str | None:
    """The key a client presented: ``Authorization: Bearer K`` or ``x-api-key: K``."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class KeyStore:
    """sha256(key) -> identity, loaded from the keys file."""

    def __init__(self, entries: dict[str, Identity]) -> None:
        self._by_hash = entries

    def __len__(self) -> int:
        return len(self._by_hash)

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        p = Path(path)
        try:
            doc: Any = yaml.safe_load(p.read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"identity.keys_file: {p}: no such file"]) from None
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError([f"identity.keys_file: {p}: cannot read: {e}"]) from None
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list):
            raise ConfigError([f"{p}: keys: expected a list of {{key_sha256|key, user, team}}"])
        entries: dict[str, Identity] = {}
        first_at: dict[str, int] = {}  # digest -> the entry that named it first
        problems = []
        for i, entry in enumerate(keys):
            where = f"{p}: keys.{i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("user"), str):
                problems.append(f"{where}: needs a 'user'")
                continue
            digest = entry.get("key_sha256")
            if digest is None and isinstance(entry.get("key"), str):
                digest = sha256_hex(entry["key"])
            if digest is None:
                problems.append(f"{where}: needs 'key_sha256' (64 hex digits) or 'key'")
                continue
            if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
                problems.append(
                    f"{where}: key_sha256 must be exactly 64 hex digits (the sha256 of the key)"
                )
                continue
            digest = digest.lower()
            if digest in first_at:  # the later entry would win: one user logs in as another
                j = first_at[digest]
                problems.append(
                    f"{where}: the same key as keys.{j} (user {entries[digest].user!r}); "
                    "each key must name one user"
                )
                continue
            first_at[digest] = i
            team = entry.get("team")
            deferrable_s = entry.get("deferrable_s")
            if deferrable_s is not None and (
                isinstance(deferrable_s, bool)
                or not isinstance(deferrable_s, int | float)
                or not math.isfinite(deferrable_s)
                or deferrable_s < 0
            ):
                problems.append(f"{where}: deferrable_s must be a number of seconds >= 0")
                continue
            entries[digest] = Identity(
                entry["user"],
                team if isinstance(team, str) else None,
                digest[:KEY_ID_CHARS],
                None if deferrable_s is None else float(deferrable_s),
            )
        if problems:
            raise ConfigError(problems)
        return cls(entries)

    def lookup(self, key: str) -> Identity | None:
        digest = sha256_hex(key)
        found = self._by_hash.get(digest)
        if found is None or found.key_id is None:
            return None
        # the dict lookup is on the hash; confirm in constant time all the same
        return found if hmac.compare_digest(digest[:KEY_ID_CHARS], found.key_id) else None


class IdentityResolver:
    """Who sends a request: its API key's user when keys are configured, else the
    ``X-Wattproxy-User`` header when allowed, else anonymous. Fixed once built (a reload builds
    a new one)."""

    def __init__(self, keys: KeyStore | None, allow_header_identity: bool) -> None:
        self._keys = keys
        self._allow_header_identity = allow_header_identity

    @property
    def keys(self) -> KeyStore | None:
        return self._keys

    @property
    def allow_header_identity(self) -> bool:
        return self._allow_header_identity

    @property
    def keys_required(self) -> bool:
        return self.keys is not None

    def resolve(self, headers: CIMultiDictProxy[str]) -> Identity:
        """The caller, or ``Unauthorized`` when keys are configured and none valid was sent."""
        keys = self.keys
        if keys is not None:
            key = bearer(headers)
            if key is None:
                raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            found = keys.lookup(key)
            if found is None:
                raise Unauthorized("invalid API key")
            return found
        if self.allow_header_identity:
            user = headers.get("X-Wattproxy-User")
            if user:
                return Identity(user[:128], (headers.get("X-Wattproxy-Team") or None))
        return Identity(ANONYMOUS)
