"""Bearer tokens for the agent's network API: who may read, deploy, or run commands.

A token is shown once, when it is made; ``KILN_HOME/tokens.json`` (0600, replaced
atomically) keeps only its SHA-256, so a copy of the home does not leak working
tokens. A 32-byte random token needs no slow hash: nothing can be guessed from a
SHA-256 of it. The agent re-reads the file when it changes, so ``kiln token revoke``
takes effect on the next request without restarting the agent. A token expires
(``expires_at``, 90 days by default); a record from before expiry existed never does.
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
    "DEFAULT_EXPIRY",
    "EDGE_ROLE",
    "ROLES",
    "TOKENS_FILE",
    "TOKEN_MAX",
    "TOKEN_ROLES",
    "TokenRecord",
    "TokenStore",
    "parse_expiry",
    "role_allows",
]

TOKENS_FILE = "tokens.json"
ROLES = ("viewer", "deployer", "admin")
"""Each role may do what the ones before it may."""
EDGE_ROLE = "edge"
"""The Swarm edge's role, outside that order: it may read the routes and post its
counters (``kiln.agent.api.EDGE_ROUTES``), nothing else, not even what a viewer reads."""
TOKEN_ROLES = (*ROLES, EDGE_ROLE)
TOKEN_PREFIX = "kiln_"
TOKEN_MAX = 128
"""A presented token longer than this is refused before it is hashed."""
_TOKEN_SHAPE = re.compile(r"kiln_[A-Za-z0-9_-]{43}")
_ID_SHAPE = re.compile(r"[0-9a-f]{12}")
_NAME_MAX = 64
DEFAULT_EXPIRY = "90d"
MAX_EXPIRY_DAYS = 3650
"""Ten years: a longer lifetime is a typo (``never`` says what it means)."""
_EXPIRY_SHAPE = re.compile(r"([1-9][0-9]{0,6})([mhdw])")
_EXPIRY_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(value: str) -> float | None:
    """``30d``, ``12h``, ``45m``, ``2w`` → seconds; ``never`` → None; anything else is
    refused with one line."""
    text = value.strip().lower()
    if text == "never":
        return None
    shape = _EXPIRY_SHAPE.fullmatch(text)
    if shape is None:
        raise KilnError(f"--expires {value!r}: expected a lifetime such as 30d, 12h, 45m or never")
    seconds = int(shape.group(1)) * _EXPIRY_UNITS[shape.group(2)]
    if seconds > MAX_EXPIRY_DAYS * 86400:
        raise KilnError(f"--expires {value!r}: at most {MAX_EXPIRY_DAYS}d (or never)")
    return float(seconds)


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
    expires_at: float | None = None
    """None: never (also every record written before tokens expired)."""

    def expired(self, now: float | None = None) -> bool:
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at

    def state(self, now: float | None = None) -> str:
        """``revoked``, ``expired`` or ``active``: revocation is the stronger word."""
        if self.revoked is not None:
            return "revoked"
        return "expired" if self.expired(now) else "active"

    def public(self) -> dict[str, Any]:
        """The record as ``kiln token list`` shows it (the hash is of no use to anyone)."""
        shown = {k: v for k, v in asdict(self).items() if k != "sha256"}
        return {**shown, "state": self.state()}


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
                    expires_at=(
                        None if item.get("expires_at") is None else float(item["expires_at"])
                    ),
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

    def create(
        self, role: str, name: str = "", expires_in: float | None = None
    ) -> tuple[TokenRecord, str]:
        """A new token of ``role`` that expires ``expires_in`` seconds from now (None:
        never); returns its record and the token (the only time it is known)."""
        if expires_in is not None and not 0 < expires_in <= MAX_EXPIRY_DAYS * 86400:
            raise KilnError(f"token lifetime: more than 0 s and at most {MAX_EXPIRY_DAYS}d")
        if role not in TOKEN_ROLES:
            raise KilnError(f"role {role!r}: use one of {', '.join(TOKEN_ROLES)}")
        if len(name) > _NAME_MAX or not name.isprintable():
            raise KilnError(f"token name: at most {_NAME_MAX} printable characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        record = TokenRecord(
            id=secrets.token_hex(6),
            name=name,
            role=role,
            sha256=_digest(token),
            created=now,
            expires_at=None if expires_in is None else now + expires_in,
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
        """The live record of ``token`` (neither revoked nor expired), or None."""
        found = self.lookup(token)
        if found is None or found.state() != "active":
            return None
        return found

    def lookup(self, token: str) -> TokenRecord | None:
        """The record of ``token`` whatever its state, or None. Every stored hash is
        compared in constant time, and all of them whatever matches, so timing tells
        nothing of which is close."""
        if len(token) > TOKEN_MAX or not _TOKEN_SHAPE.fullmatch(token):
            return None
        presented = _digest(token)
        found: TokenRecord | None = None
        for record in self.records():
            if hmac.compare_digest(presented, record.sha256):
                found = record
        return found
