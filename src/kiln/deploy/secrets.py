"""Secret values: versioned, encrypted at rest, kept outside every plan, revision, event and image.

A revision pins secret *versions* (``{"api_key": "v2"}``), never values: the
planner hashes the versions into ``config_hash`` so a rotation replaces the
instances, and the agent reads the pinned values from this store when it
starts an instance. Versions are immutable and kept, so a rollback to a
revision pinned on ``v1`` gets ``v1``'s value back.

Layout under ``KILN_HOME/secrets`` (directories 0700, files 0600)::

    .key                 the store key, base64 of 32 bytes (not made when KILN_SECRET_KEY is set)
    .keycheck            proves a key is this store's before anything is read or written
    .lock                serialises making the key and migrating clear-text values
    <name>/v1, v2, …     the values, encrypted, written once, never changed
    <name>/current.json  {"version": "v2" | null, "serial": 2, "updated": 1700000000.0}
    <name>/.lock         serialises writers of one name

A value file is ``KILNSEC1`` + a random 12-byte nonce + the AES-256-GCM
ciphertext and its 16-byte tag. The associated data is
``kiln-secret\\0NAME\\0VERSION``, so a file copied or swapped to another name or
version does not decrypt. The key is ``KILN_SECRET_KEY`` (64 hex digits or the
base64 of 32 bytes) when set, else the key file, made on first use. A store
written in clear by an older Kiln (no ``.keycheck``) is encrypted in place the
first time a value is read or set; after that a file without the magic is
refused like a tampered one.

``remove`` deletes every value of a name (what a user who removes a leaked
credential expects), and any temp file a crashed writer left, but keeps
``current.json`` with its serial, so a later ``set`` continues at the next
number and a version name never comes to mean another value. Instances
already running keep the copy they were started with (on tmpfs, by the
runtime); starting one from a revision that pins a removed version fails with
an event that says so.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hmac
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kiln.errors import KilnError

__all__ = [
    "KEY_ENV",
    "KEY_FILE",
    "MAGIC",
    "MAX_SECRET_BYTES",
    "SecretInfo",
    "SecretStore",
    "check_secret_name",
    "parse_key",
]

MAX_SECRET_BYTES = 1024 * 1024
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
VERSION_RE = re.compile(r"v[1-9][0-9]*")
KEY_ENV = "KILN_SECRET_KEY"
KEY_FILE = ".key"
MAGIC = b"KILNSEC1"
_CHECK_MAGIC = b"KILNKEY1"
_CHECK_AD = b"kiln-secret-key-check\0"
_NONCE = 12
_TAG = 16
_OVERHEAD = len(MAGIC) + _NONCE + _TAG
_CURRENT = "current.json"
_KEYCHECK = ".keycheck"
_LOCK = ".lock"
_TMP = ".tmp-"
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_SMALL = 64 * 1024


@dataclass(frozen=True)
class SecretInfo:
    name: str
    version: str
    updated: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "updated": self.updated}


@dataclass(frozen=True)
class _Key:
    aead: AESGCM
    source: str  # where the key came from, for messages: never the key


def check_secret_name(name: str, where: str = "secret") -> None:
    if not NAME_RE.fullmatch(name) or len(name) > 128:
        raise KilnError(
            f"{where}: {name!r} is not a valid secret name "
            "(lower-case letters, digits, '_', '.', '-'; starting with a letter or digit)"
        )


def parse_key(text: str, source: str) -> bytes:
    """64 hex digits or the standard base64 of 32 bytes; the message never shows ``text``."""
    s = text.strip()
    if _HEX_KEY.fullmatch(s):
        return bytes.fromhex(s)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return raw
    raise KilnError(
        f"{source} is not a secret key: it must be 64 hex digits or the base64 of "
        "32 random bytes (make one with: openssl rand -base64 32); its value is not shown"
    )


class SecretStore:
    """Creating one touches nothing: the agent opens one on every instance start.

    The key is loaded (and a clear-text store migrated) on the first value read
    or written, so ``list``, ``current`` and ``remove`` work without the key.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._key: _Key | None = None

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
        key = self._open(f"secret {name}")  # before the name's lock: store lock, then name lock
        with self._locked(name) as directory:
            record = _read_current(directory)
            version = record.get("version")
            if isinstance(version, str) and VERSION_RE.fullmatch(version):
                current = directory / version
                if os.path.lexists(current):
                    old = _unseal(key, name, version, _read_value(current, name, version))
                    if hmac.compare_digest(old, value):
                        return version
            serial = max([int(record.get("serial", 0)), *_serials(directory)]) + 1
            version = f"v{serial}"
            _write_atomic(directory, version, _seal(key, name, version, value), replace=False)
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
        path = self.root / name / version
        if not os.path.lexists(path):
            raise _missing(self.root, name, version)
        key = self._open(f"secret {name} {version}")
        return _unseal(key, name, version, _read_value(path, name, version))

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
        """Delete every value of ``name`` (and stray temp files); its serial stays so
        versions are never reused. Needs no key: a wrong key must not keep a leak alive."""
        check_secret_name(name)
        if self.current(name) is None:
            raise KilnError(
                f"secret {name} is not set in KILN_HOME {self.root.parent}; "
                "kiln secret list shows the secrets"
            )
        with self._locked(name) as directory:
            serial = int(_read_current(directory).get("serial", 0))
            for path in directory.iterdir():
                if path.name not in (_CURRENT, _LOCK) and not _is_real_dir(path):
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
                    home = self.root.parent
                    raise KilnError(
                        f"services.{service}.secrets: secret {name} is not set in KILN_HOME "
                        f"{home}; set it with: KILN_HOME={home} kiln secret set {name}"
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

    # the key

    def _open(self, what: str) -> _Key:
        """Load the key and prove it is this store's, migrating a clear-text store the
        first time; ``what`` names the secret in the messages."""
        if self._key is not None:
            return self._key
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        with _flock(self.root / _LOCK):
            _remove_temps(self.root)
            key = self._load_key(what)
            self._check_key(key, what)
        self._key = key
        return key

    def _load_key(self, what: str) -> _Key:
        path = self.root / KEY_FILE
        env = os.environ.get(KEY_ENV)
        if env is not None:
            return _Key(AESGCM(parse_key(env, f"{what}: {KEY_ENV}")), KEY_ENV)
        try:
            text = _read_key_file(path, what)
        except FileNotFoundError:
            if self._encrypted():
                raise KilnError(
                    f"{what}: the secret store {self.root} is encrypted but its key file "
                    f"{path} is missing; restore it from a backup, or set {KEY_ENV} to the "
                    "store's key; nothing was changed"
                ) from None
            text = _make_key_file(path)
        return _Key(AESGCM(parse_key(text, f"{what}: key file {path}")), f"the key file {path}")

    def _check_key(self, key: _Key, what: str) -> None:
        """A wrong key fails here, before a value is written under it."""
        check = self.root / _KEYCHECK
        data = _read_small(check)
        if data is None:
            sample = self._any_encrypted_value()
            if sample is None or _opens(key, *sample):
                self._migrate(key)
                nonce = os.urandom(_NONCE)
                sealed = _CHECK_MAGIC + nonce + key.aead.encrypt(nonce, b"", _CHECK_AD)
                _write_atomic(self.root, _KEYCHECK, sealed, replace=True)
                return
        elif data.startswith(_CHECK_MAGIC) and len(data) == len(_CHECK_MAGIC) + _NONCE + _TAG:
            nonce = data[len(_CHECK_MAGIC) : len(_CHECK_MAGIC) + _NONCE]
            with contextlib.suppress(InvalidTag):
                key.aead.decrypt(nonce, data[len(_CHECK_MAGIC) + _NONCE :], _CHECK_AD)
                return
        if key.source == KEY_ENV:
            fix = (
                f"set {KEY_ENV} to the key the store was written with, or unset it to use "
                f"the key file {self.root / KEY_FILE}"
            )
        else:
            fix = f"restore the store's key file, or set {KEY_ENV} to the store's key"
        raise KilnError(
            f"{what}: cannot decrypt: {key.source} is not the key of the secret store "
            f"{self.root}; {fix}; nothing was changed"
        )

    def _encrypted(self) -> bool:
        return (self.root / _KEYCHECK).exists() or self._any_encrypted_value() is not None

    def _any_encrypted_value(self) -> tuple[str, str, bytes] | None:
        for directory, path in self._value_files():
            data = _read_small(path, MAX_SECRET_BYTES + _OVERHEAD)
            if data is not None and data.startswith(MAGIC):
                return directory.name, path.name, data
        return None

    def _value_files(self) -> Iterator[tuple[Path, Path]]:
        for directory in sorted(self.root.iterdir()):
            if NAME_RE.fullmatch(directory.name) and _is_real_dir(directory):
                for path in sorted(directory.iterdir()):
                    if VERSION_RE.fullmatch(path.name):
                        yield directory, path

    def _migrate(self, key: _Key) -> None:
        """Encrypt clear-text values in place (temp file, fsync, rename), each name
        under its lock so a concurrent ``remove`` cannot bring a value back."""
        for directory in sorted(self.root.iterdir()):
            if not (NAME_RE.fullmatch(directory.name) and _is_real_dir(directory)):
                continue
            with self._locked(directory.name):
                for path in sorted(directory.iterdir()):
                    if not VERSION_RE.fullmatch(path.name):
                        continue
                    # An oversized or odd file was never a value: left alone, refused on read.
                    data = _read_small(path, MAX_SECRET_BYTES)
                    if data is not None and not data.startswith(MAGIC):
                        sealed = _seal(key, directory.name, path.name, data)
                        _write_atomic(directory, path.name, sealed, replace=True)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """The name's lock; temp files found while holding it are a dead writer's."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        directory = self.root / name
        directory.mkdir(mode=0o700, exist_ok=True)
        with _flock(directory / _LOCK):
            _remove_temps(directory)
            yield directory


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _seal(key: _Key, name: str, version: str, value: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return MAGIC + nonce + key.aead.encrypt(nonce, value, _associated(name, version))


def _unseal(key: _Key, name: str, version: str, data: bytes) -> bytes:
    if not _opens(key, name, version, data):
        raise KilnError(
            f"secret {name} {version}: cannot decrypt: wrong key or the file was tampered "
            f"with / moved (the key is {key.source})"
        )
    nonce = data[len(MAGIC) : len(MAGIC) + _NONCE]
    return key.aead.decrypt(nonce, data[len(MAGIC) + _NONCE :], _associated(name, version))


def _opens(key: _Key, name: str, version: str, data: bytes) -> bool:
    if not data.startswith(MAGIC) or len(data) < _OVERHEAD:
        return False
    nonce = data[len(MAGIC) : len(MAGIC) + _NONCE]
    try:
        key.aead.decrypt(nonce, data[len(MAGIC) + _NONCE :], _associated(name, version))
    except InvalidTag:
        return False
    return True


def _associated(name: str, version: str) -> bytes:
    """Binds a ciphertext to its place: names and versions never hold a NUL."""
    return b"kiln-secret\0" + name.encode() + b"\0" + version.encode()


def _missing(root: Path, name: str, version: str) -> KilnError:
    return KilnError(
        f"secret {name} {version} is not in the secret store {root} "
        f"(removed?); set it with: kiln secret set {name}, then kiln apply"
    )


def _read_value(path: Path, name: str, version: str) -> bytes:
    """At most one value's worth of bytes: a planted 10 GB file is refused, not read."""
    try:
        data = _read_small(path, MAX_SECRET_BYTES + _OVERHEAD)
    except OSError as e:
        raise KilnError(f"secret {name} {version}: {e.strerror or e}") from None
    if data is None:
        if not os.path.lexists(path):
            raise _missing(path.parent.parent, name, version)
        raise KilnError(
            f"secret {name} {version}: {path} is not a regular file of at most "
            f"{MAX_SECRET_BYTES + _OVERHEAD} bytes; refusing to read it"
        )
    return data


def _read_small(path: Path, limit: int = _SMALL) -> bytes | None:
    """The bytes of a regular file (no symlink) of at most ``limit`` bytes, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        return None
    finally:
        os.close(fd)


def _read_key_file(path: Path, what: str) -> str:
    """Refused like ssh refuses a private key: another owner or group/other access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KilnError(f"{what}: key file {path}: {e.strerror or e}; refusing to use it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KilnError(f"{what}: key file {path} is not a regular file; refusing to use it")
        if st.st_uid != os.geteuid():
            raise KilnError(
                f"{what}: key file {path} is owned by uid {st.st_uid}, not by uid {os.geteuid()} "
                "that runs kiln; refusing to use it"
            )
        if st.st_mode & 0o077:
            raise KilnError(
                f"{what}: permissions {stat.S_IMODE(st.st_mode):04o} for key file {path} are too "
                "open: it must be readable by its owner only; refusing to use it (if others "
                f"could read it, treat the secrets as leaked; then: chmod 600 {path})"
            )
        data = os.read(fd, _SMALL) if st.st_size <= 1024 else b""
    finally:
        os.close(fd)
    return data.decode("ascii", errors="replace")


def _make_key_file(path: Path) -> str:
    """A fresh key, created 0600 (O_EXCL) and linked into place whole, never chmod-ed."""
    text = base64.b64encode(AESGCM.generate_key(bit_length=256)).decode() + "\n"
    tmp = path.parent / f"{_TMP}key-{os.urandom(8).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return text


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove_temps(directory: Path) -> None:
    """Called under the lock that every writer of ``directory`` holds, so any temp file is
    a crashed writer's, which may hold a value (in clear, if an older Kiln wrote it)."""
    for path in directory.iterdir():
        if path.name.startswith(_TMP) and not _is_real_dir(path):
            path.unlink()


def _read_current(directory: Path) -> dict[str, Any]:
    path = directory / _CURRENT
    try:
        raw = _read_small(path)
        if raw is None:
            if os.path.lexists(path):
                raise ValueError("not a small regular file")
            return {}
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise KilnError(f"{path}: unreadable ({e})") from e
    return data if isinstance(data, dict) else {}


def _serials(directory: Path) -> list[int]:
    """Versions on disk count too: a crash between the value and current.json loses none."""
    return [int(p.name[1:]) for p in directory.iterdir() if VERSION_RE.fullmatch(p.name)]


def _write_current(directory: Path, version: str | None, serial: int) -> None:
    record = {"version": version, "serial": serial, "updated": time.time()}
    _write_atomic(directory, _CURRENT, json.dumps(record).encode(), replace=True)


def _write_atomic(directory: Path, name: str, data: bytes, *, replace: bool) -> None:
    """Write to a 0600 temp file, fsync, then rename (or link, when ``name`` must be new)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TMP)
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
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
