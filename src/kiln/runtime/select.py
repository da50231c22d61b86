"""The runtime a home uses, by the name ``kiln.toml`` gives it (``[runtime] kind``).

Each runtime's module is imported only when chosen: ``kiln --version`` or a
local-only project never loads the Docker SDK.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.runtime import Runtime

__all__ = ["RUNTIME_KINDS", "RuntimeChoice", "open_runtime", "read_choice", "write_choice"]

CHOICE_FILE = "runtime.json"

RUNTIME_KINDS = ("local", "docker")


def open_runtime(home: Path, kind: str = "local", host: str | None = None) -> Runtime:
    """A runtime for ``home``: ``local`` (runc on this machine) or ``docker`` (the
    engine at ``host``, default ``DOCKER_HOST`` or /run/docker.sock)."""
    if kind == "local":
        if host is not None:
            raise KilnError(f'runtime host {host!r} is only used with kind = "docker", not "local"')
        from kiln.runtime.local import LocalRuntime

        return LocalRuntime(home)
    if kind == "docker":
        from kiln.runtime.docker import DockerRuntime

        return DockerRuntime(home, host)
    raise KilnError(f"unknown runtime kind {kind!r}: use one of {', '.join(RUNTIME_KINDS)}")


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime a home's agent uses: recorded in ``KILN_HOME/runtime.json`` by the first
    agent, so every later agent (and ``kiln down`` without one) opens the same."""

    kind: str = "local"
    host: str | None = None

    def open(self, home: Path) -> Runtime:
        return open_runtime(home, self.kind, self.host)

    def describe(self) -> str:
        return self.kind + (f" at {self.host}" if self.host else "")

    def to_json(self) -> dict[str, str | None]:
        return {"kind": self.kind, "host": self.host}


def read_choice(home: Path) -> RuntimeChoice | None:
    try:
        data = json.loads((home / CHOICE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise KilnError(f"{home / CHOICE_FILE}: unreadable ({e}); remove it to choose again") from e
    if not isinstance(data, dict) or data.get("kind") not in RUNTIME_KINDS:
        raise KilnError(f"{home / CHOICE_FILE}: not a runtime choice; remove it to choose again")
    host = data.get("host")
    return RuntimeChoice(str(data["kind"]), str(host) if host else None)


def write_choice(home: Path, choice: RuntimeChoice) -> None:
    from kiln.paths import write_private

    write_private(home / CHOICE_FILE, json.dumps(choice.to_json()).encode())
