"""Named remote agents the CLI can target, as docker and kubectl keep them.

``$XDG_CONFIG_HOME/kiln/contexts.json`` (default ``~/.config/kiln``; directory 0700,
file 0600, replaced atomically under a lock) holds, per name, the agent's address, a
copy of its token (so the token file may be deleted, and the token is never printed
back) and the path of the CA to trust. Which agent the CLI talks to, first match wins:
``KILN_ADDR`` (with ``KILN_TOKEN``/``KILN_CA``), then ``KILN_CONTEXT``, then the current
context, then the home's own socket. ``KILN_TOKEN`` and ``KILN_CA`` also override the
token and CA of a context.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.paths import open_private, private_dirs, write_private

__all__ = [
    "CONTEXTS_FILE",
    "LOCAL",
    "Context",
    "ContextStore",
    "RemoteTarget",
    "config_dir",
    "resolve_target",
]

CONTEXTS_FILE = "contexts.json"
LOCAL = "local"
"""The reserved name of the home's own socket: ``kiln context use local`` goes back to it."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_TOKEN = re.compile(r"kiln_[A-Za-z0-9_-]{43}")
_TOKEN_FILE_MAX = 4096


def config_dir() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "kiln"


@dataclass(frozen=True)
class Context:
    name: str
    addr: str
    """``https://HOST:PORT``"""
    token: str
    ca: str | None = None
    """An absolute path, or None for the system's CAs."""

    def public(self, current: bool) -> dict[str, Any]:
        """What ``kiln context list`` shows: never the token."""
        return {"name": self.name, "addr": self.addr, "ca": self.ca, "current": current}


@dataclass(frozen=True)
class RemoteTarget:
    """A remote agent to talk to, and where the choice came from (for error messages)."""

    addr: str
    token: str | None
    ca: Path | None
    source: str


def normalize_addr(value: str) -> str:
    """``HOST:PORT``, ``[V6]:PORT`` or ``https://`` + either → ``https://HOST:PORT``."""
    text = value.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme != "https":
            raise KilnError(f"--addr {value!r}: the agent speaks https only")
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (
        not sep
        or not bare
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or any(c in bare for c in "/@?#[] ")
        or not bare.isprintable()
    ):
        raise KilnError(f"--addr {value!r}: expected HOST:PORT, e.g. 10.0.0.5:7443")
    return f"https://{host}:{int(port)}"


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise KilnError(f"context name {name[:70]!r}: letters, digits, '_', '.', '-' (at most 63)")


def read_token_file(path: Path) -> str:
    """The one token a file holds (surrounding whitespace ignored)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_TOKEN_FILE_MAX + 1)
    except OSError as e:
        raise KilnError(f"--token-file {path}: {e.strerror or e}") from None
    token = data.strip().decode("ascii", errors="replace")
    if len(data) > _TOKEN_FILE_MAX or not _TOKEN.fullmatch(token):
        raise KilnError(f"--token-file {path}: does not hold a token from `kiln token create`")
    return token


class ContextStore:
    """``contexts.json``: add, use, list, remove."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or config_dir()
        self.path = self.directory / CONTEXTS_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: two ``kiln context add`` must not lose each other's."""
        private_dirs(self.directory)
        fd = open_private(self.directory / ".contexts.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> tuple[str | None, dict[str, Context]]:
        """The current context's name (None: the local socket) and every context."""
        try:
            data = json.loads(self.path.read_bytes())
            contexts = {
                str(name): Context(
                    name=str(name),
                    addr=str(item["addr"]),
                    token=str(item["token"]),
                    ca=None if item.get("ca") is None else str(item["ca"]),
                )
                for name, item in dict(data.get("contexts") or {}).items()
            }
            current = data.get("current")
        except FileNotFoundError:
            return None, {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise KilnError(f"{self.path}: unreadable context file ({e})") from None
        return (str(current) if current in contexts else None), contexts

    def _write(self, current: str | None, contexts: dict[str, Context]) -> None:
        data = {
            "current": current,
            "contexts": {
                name: {"addr": c.addr, "token": c.token, "ca": c.ca}
                for name, c in sorted(contexts.items())
            },
        }
        write_private(self.path, (json.dumps(data, indent=2) + "\n").encode())

    def add(self, name: str, addr: str, token_file: Path, ca: Path | None) -> Context:
        _check_name(name)
        if name == LOCAL:
            raise KilnError(f"context name {LOCAL!r} is the home's own socket; choose another")
        context = Context(
            name=name,
            addr=normalize_addr(addr),
            token=read_token_file(token_file),
            ca=None if ca is None else str(_existing_ca(ca, f"--ca {ca}")),
        )
        with self._locked():
            current, contexts = self.read()
            if name in contexts:
                raise KilnError(f"context {name} exists; `kiln context remove {name}` first")
            contexts[name] = context
            self._write(current, contexts)
        return context

    def use(self, name: str) -> None:
        with self._locked():
            _, contexts = self.read()
            if name != LOCAL and name not in contexts:
                raise _unknown(name)
            self._write(None if name == LOCAL else name, contexts)

    def remove(self, name: str) -> None:
        with self._locked():
            current, contexts = self.read()
            if contexts.pop(name, None) is None:
                raise _unknown(name)
            self._write(None if current == name else current, contexts)


def _unknown(name: str) -> KilnError:
    shown = name if _NAME.fullmatch(name) else repr(name[:40])
    return KilnError(f"no context {shown}; `kiln context list` shows them")


def _existing_ca(path: Path, where: str) -> Path:
    absolute = Path(path).absolute()
    if not absolute.is_file():
        raise KilnError(f"{where}: no such CA file {absolute}")
    return absolute


def resolve_target() -> RemoteTarget | None:
    """The remote agent the CLI targets, or None for the home's socket."""
    env_addr = os.environ.get("KILN_ADDR")
    env_token = os.environ.get("KILN_TOKEN") or None
    env_ca = os.environ.get("KILN_CA")
    if env_addr:
        return RemoteTarget(env_addr, env_token, Path(env_ca) if env_ca else None, "KILN_ADDR")
    named = os.environ.get("KILN_CONTEXT") or None
    store = ContextStore()
    if named == LOCAL:
        return None
    current, contexts = store.read()
    name = named or current
    if name is None:
        return None
    context = contexts.get(name)
    if context is None:
        raise _unknown(name)
    ca: Path | None = Path(env_ca) if env_ca else None
    if ca is None and context.ca is not None:
        ca = _existing_ca(Path(context.ca), f"context {name}")
    return RemoteTarget(context.addr, env_token or context.token, ca, f"context {name}")
