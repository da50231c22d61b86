"""Secret values, versioned and kept outside every plan, revision, event and image.

A revision pins secret *versions* (``{"api_key": "v2"}``), never values: the
planner hashes the versions into ``config_hash`` so a rotation replaces the
instances, and the agent reads the pinned values from this store when it
starts an instance. Versions are immutable and kept, so a rollback to a
revision pinned on ``v1`` gets ``v1``'s value back.

Layout under ``KILN_HOME/secrets`` (directories 0700, files 0600)::

    <name>/v1, v2, …     the values, written once, never changed
    <name>/current.json  {"version": "v2" | null, "serial": 2, "updated": 1700000000.0}
    <name>/.lock         serialises writers of one name

``remove`` deletes every value of a name (what a user who removes a leaked
credential expects) but keeps ``current.json`` with its serial, so a later
``set`` continues at the next number and a version name never comes to mean
another value. Instances already running keep the copy they were started
with; starting one from a revision that pins a removed version fails with an
event that says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

__all__ = ["MAX_SECRET_BYTES", "SecretInfo", "SecretStore", "check_secret_name"]

MAX_SECRET_BYTES = 1024 * 1024
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
VERSION_RE = re.compile(r"v[1-9][0-9]*")
_CURRENT = "current.json"


@dataclass(frozen=True)
class SecretInfo:
    name: str
    version: str
    updated: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "updated": self.updated}


def check_secret_name(name: str, where: str = "secret") -> None:
    if not NAME_RE.fullmatch(name) or len(name) > 128:
        raise KilnError(
            f"{where}: {name!r} is not a valid secret name "
            "(lower-case letters, digits, '_', '.', '-'; starting with a letter or digit)"
        )


class SecretStore:
    """Creating one touches nothing: the agent opens it read-only on every start."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def set(self, name: str, value: bytes) -> str:
        """Store ``value`` as the next version of ``name`` and make it current.

        The same bytes as the current version are a no-op that returns the
        current version, so re-running a provisioning script replaces nothing.
        """
        check_secret_name(name)
        if not value:
            raise KilnError(f"secret {name}: the value is empty; pass it on stdin or --from-file")
        if len(value) > MAX_SECRET_BYTES:
            raise KilnError(
                f"secret {name}: {len(value)} bytes is over the limit of "
                f"{MAX_SECRET_BYTES} bytes (1 MiB)"
            )
        with self._locked(name) as directory:
            record = _read_current(directory)
            version = record.get("version")
            if isinstance(version, str):
                current = directory / version
                if current.is_file() and hmac.compare_digest(current.read_bytes(), value):
                    return version
            serial = max([int(record.get("serial", 0)), *_serials(directory)]) + 1
            version = f"v{serial}"
            _write_atomic(directory, version, value, replace=False)
            _write_current(directory, version, serial)
            return version

    def current(self, name: str) -> str | None:
        check_secret_name(name)
        version = _read_current(self.root / name).get("version")
        return version if isinstance(version, str) else None

    def read(self, name: str, version: str) -> bytes:
        check_secret_name(name)
        if not VERSION_RE.fullmatch(version):
            raise KilnError(f"secret {name}: {version!r} is not a version (v1, v2, …)")
        try:
            return (self.root / name / version).read_bytes()
        except FileNotFoundError:
            raise KilnError(
                f"secret {name} {version} is not in the secret store {self.root} "
                f"(removed?); set it with: kiln secret set {name}, then kiln apply"
            ) from None
        except OSError as e:
            raise KilnError(f"secret {name} {version}: {e.strerror or e}") from e

    def list(self) -> list[SecretInfo]:
        if not self.root.is_dir():
            return []
        out: list[SecretInfo] = []
        for directory in sorted(self.root.iterdir()):
            if not NAME_RE.fullmatch(directory.name):
                continue
            record = _read_current(directory)
            version = record.get("version")
            if isinstance(version, str):
                out.append(SecretInfo(directory.name, version, float(record.get("updated", 0))))
        return out

    def remove(self, name: str) -> None:
        """Delete every value of ``name``; its serial stays so versions are never reused."""
        check_secret_name(name)
        if self.current(name) is None:
            raise KilnError(f"secret {name} is not set; kiln secret list shows the secrets")
        with self._locked(name) as directory:
            serial = int(_read_current(directory).get("serial", 0))
            for path in directory.iterdir():
                if VERSION_RE.fullmatch(path.name):
                    path.unlink()
            _write_current(directory, None, serial)

    def versions_for(self, needs: Mapping[str, Iterable[str]]) -> dict[str, str]:
        """``needs`` maps service → the secret names it declares; returns name → current
        version, or names the first service whose secret is not set."""
        out: dict[str, str] = {}
        for service, names in sorted(needs.items()):
            for name in names:
                check_secret_name(name, f"services.{service}.secrets")
                version = out.get(name) or self.current(name)
                if version is None:
                    raise KilnError(
                        f"services.{service}.secrets: secret {name} is not set; "
                        f"set it with: kiln secret set {name}"
                    )
                out[name] = version
        return out

    def values_for(self, versions: Mapping[str, str]) -> dict[str, bytes]:
        """The values a revision pins, for the instance about to start."""
        out: dict[str, bytes] = {}
        for name, version in sorted(versions.items()):
            if not version:
                raise KilnError(
                    f"secret {name}: the revision pins no version; "
                    f"set it with: kiln secret set {name}, then kiln apply"
                )
            out[name] = self.read(name, version)
        return out

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        directory = self.root / name
        directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield directory
        finally:
            os.close(fd)


def _read_current(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / _CURRENT).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise KilnError(f"{directory / _CURRENT}: unreadable ({e})") from e
    return data if isinstance(data, dict) else {}


def _serials(directory: Path) -> list[int]:
    """Versions on disk count too: a crash between the value and current.json loses none."""
    return [int(p.name[1:]) for p in directory.iterdir() if VERSION_RE.fullmatch(p.name)]


def _write_current(directory: Path, version: str | None, serial: int) -> None:
    record = {"version": version, "serial": serial, "updated": time.time()}
    _write_atomic(directory, _CURRENT, json.dumps(record).encode(), replace=True)


def _write_atomic(directory: Path, name: str, data: bytes, *, replace: bool) -> None:
    """Write to a 0600 temp file, fsync, then rename (or link, when ``name`` must be new)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, directory / name)
        else:
            os.link(tmp, directory / name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
