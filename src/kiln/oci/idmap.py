"""The unprivileged host id range that a Kiln home maps its sandboxes onto.

Root inside an instance or a bake step is ``base`` outside, uid N inside is
``base + N``, as with Docker's userns-remap. Every sandbox of one home shares
one range (Docker does the same); the range is chosen once per home and
recorded in ``KILN_HOME/idmap.json`` so snapshots unpacked with shifted
ownership stay valid. Ranges are picked from the path of the home so two homes
on one machine almost never share one; ids below ``FIRST_BASE`` (real users,
/etc/subuid's usual 100000 block) are never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError

__all__ = ["FIRST_BASE", "RANGE_SIZE", "IdRange", "id_range"]

RANGE_SIZE = 65536
FIRST_BASE = 1 << 24
_SLOTS = 4096
_FILE = "idmap.json"
OVERFLOW_ID = 65534


@dataclass(frozen=True)
class IdRange:
    """Container ids ``0..size-1`` ↔ host ids ``base..base+size-1`` (uids and gids alike)."""

    base: int
    size: int = RANGE_SIZE

    def to_host(self, inner: int) -> int:
        """Host id of a container id; ids outside the range cannot be represented."""
        if not 0 <= inner < self.size:
            raise KilnError(f"id {inner} is outside the {self.size} ids a sandbox maps")
        return self.base + inner

    def to_container(self, host: int) -> int:
        """Container id of a host id; outside the range it is 'nobody', as the kernel shows it."""
        if self.base <= host < self.base + self.size:
            return host - self.base
        return OVERFLOW_ID

    def contains(self, host: int) -> bool:
        return self.base <= host < self.base + self.size

    def oci_mappings(self) -> list[dict[str, int]]:
        return [{"containerID": 0, "hostID": self.base, "size": self.size}]

    def to_json(self) -> dict[str, int]:
        return {"base": self.base, "size": self.size}


def _default_base(home: Path) -> int:
    slot = int.from_bytes(hashlib.sha256(str(home).encode()).digest()[:4], "big") % _SLOTS
    return FIRST_BASE + slot * RANGE_SIZE


def id_range(home: Path) -> IdRange:
    """The range recorded for ``home``, chosen and recorded on first use."""
    path = home / _FILE
    try:
        data = json.loads(path.read_text())
        found = IdRange(base=int(data["base"]), size=int(data["size"]))
    except FileNotFoundError:
        found = None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KilnError(
            f"{path}: unreadable id range ({e}); remove it only with no instances"
        ) from e
    if found is not None:
        if found.base < FIRST_BASE or found.size != RANGE_SIZE or found.base + found.size > 1 << 32:
            raise KilnError(f"{path}: base {found.base} size {found.size} is not a usable range")
        return found
    chosen = IdRange(_default_base(home.absolute()))
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(chosen.to_json()))
    try:
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink()
        return id_range(home)
    tmp.unlink()
    return chosen
