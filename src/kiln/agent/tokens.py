"""Bearer tokens for the agent's network API: who may read, deploy, or run commands.

A token is shown once, when it is made; ``KILN_HOME/tokens.json`` (0600, replaced
atomically) keeps only its SHA-256, so a copy of the home does not leak working
tokens. A 32-byte random token needs no slow hash: nothing can be guessed from a
SHA-256 of it. The agent re-reads the file when it changes, so ``kiln token revoke``
takes effect on the next request without restarting the agent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.paths import open_private, write_private

__all__ = [
    "ROLES",
    "TOKENS_FILE",
    "TOKEN_MAX",
    "TokenRecord",
    "TokenStore",
    "role_allows",
]

TOKENS_FILE = "tokens.json"
ROLES = ("viewer", "deployer", "admin")
"""Each role may do what the ones before it may."""
TOKEN_PREFIX = "kiln_"
TOKEN_MAX = 128
"""A presented token longer than this is refused before it is hashed."""
_TOKEN_SHAPE = re.compile(r"kiln_[A-Za-z0-9_-]{43}")
_ID_SHAPE = re.compile(r"[0-9a-f]{12}")
_NAME_MAX = 64


def role_allows(granted: str, required: str) -> bool:
    """Whether a token of role ``granted`` may use a route that needs ``required``."""
    if granted not in ROLES or required not in ROLES:
        return False
    return ROLES.index(granted) >= ROLES.index(required)


@dataclass(frozen=True)
class TokenRecord:
    """What the home keeps of a token: never the token itself."""

    id: str
    name: str
    role: str
    sha256: str
    created: float
    revoked: float | None = None

    def public(self) -> dict[str, Any]:
        """The record as ``kiln token list`` shows it (the hash is of no use to anyone)."""
        return {k: v for k, v in asdict(self).items() if k != "sha256"}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """``KILN_HOME/tokens.json``: create, list, revoke, and check a presented token."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.path = self.home / TOKENS_FILE
        self._cached: tuple[tuple[int, int, int], list[TokenRecord]] | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: two ``kiln token create`` must not lose each other's token."""
        fd = open_private(self.home / ".tokens.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def records(self) -> list[TokenRecord]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        records = self._read()
        self._cached = (key, records)
        return records

    def _read(self) -> list[TokenRecord]:
        try:
            data = json.loads(self.path.read_bytes())
            return [
                TokenRecord(
                    id=str(item["id"]),
                    name=str(item.get("name") or ""),
                    role=str(item["role"]),
                    sha256=str(item["sha256"]),
                    created=float(item["created"]),
                    revoked=None if item.get("revoked") is None else float(item["revoked"]),
                )
                for item in data["tokens"]
            ]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KilnError(f"{self.path}: unreadable token file ({e})") from None

    def _write(self, records: list[TokenRecord]) -> None:
        data = {"tokens": [asdict(r) for r in records]}
        write_private(self.path, (json.dumps(data, indent=2) + "\n").encode())

    def create(self, role: str, name: str = "") -> tuple[TokenRecord, str]:
        """A new token of ``role``; returns its record and the token (the only time it is
        known)."""
        if role not in ROLES:
            raise KilnError(f"role {role!r}: use one of {', '.join(ROLES)}")
        if len(name) > _NAME_MAX or not name.isprintable():
            raise KilnError(f"token name: at most {_NAME_MAX} printable characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(
            id=secrets.token_hex(6),
            name=name,
            role=role,
            sha256=_digest(token),
            created=time.time(),
        )
        with self._locked():
            self._write([*self._read(), record])
        return record, token

    def revoke(self, token_id: str) -> TokenRecord:
        with self._locked():
            records = self._read()
            for i, record in enumerate(records):
                if record.id == token_id:
                    if record.revoked is not None:
                        raise KilnError(f"token {token_id} is already revoked")
                    revoked = TokenRecord(**{**asdict(record), "revoked": time.time()})
                    records[i] = revoked
                    self._write(records)
                    return revoked
        shown = token_id if _ID_SHAPE.fullmatch(token_id) else repr(token_id[:40])
        raise KilnError(f"no token {shown}; `kiln token list` shows them")

    def check(self, token: str) -> TokenRecord | None:
        """The live record of ``token``, or None. Every stored hash is compared in constant
        time, and all of them whatever matches, so timing tells nothing of which is close."""
        if len(token) > TOKEN_MAX or not _TOKEN_SHAPE.fullmatch(token):
            return None
        presented = _digest(token)
        found: TokenRecord | None = None
        for record in self.records():
            if hmac.compare_digest(presented, record.sha256):
                found = record
        if found is None or found.revoked is not None:
            return None
        return found
