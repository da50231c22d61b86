"""The runtime a home uses, by the name ``kiln.toml`` gives it (``[runtime] kind``).

Each runtime's module is imported only when chosen: ``kiln --version`` or a
local-only project never loads the Docker SDK.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runtime import Runtime

__all__ = [
    "RUNTIME_KINDS",
    "Registry",
    "RuntimeChoice",
    "open_runtime",
    "read_choice",
    "write_choice",
]

CHOICE_FILE = "runtime.json"

RUNTIME_KINDS = ("local", "docker", "swarm")


def open_runtime(
    home: Path,
    kind: str = "local",
    host: str | None = None,
    registry: Registry | None = None,
    nodes: dict[str, str] | None = None,
) -> Runtime:
    """A runtime for ``home``: ``local`` (runc on this machine), ``docker`` (the engine at
    ``host``, default ``DOCKER_HOST`` or /run/docker.sock) or ``swarm`` (the manager at
    ``host``, images pushed to ``registry``, each node's own engine in ``nodes``)."""
    if kind == "local":
        if host is not None:
            raise KilnError(f'runtime host {host!r} is only used with kind = "docker" or "swarm"')
        from kiln.runtime.local import LocalRuntime

        return LocalRuntime(home)
    if kind == "docker":
        from kiln.runtime.docker import DockerRuntime

        return DockerRuntime(home, host)
    if kind == "swarm":
        from kiln.image.registry import RegistryOptions
        from kiln.runtime.swarm import SwarmRuntime

        if registry is None:
            raise KilnError('the swarm runtime needs [runtime] registry = "HOST[:PORT]/PATH"')
        options = RegistryOptions(
            ca_file=Path(registry.ca) if registry.ca else None,
            auth_file=Path(registry.auth_file) if registry.auth_file else None,
            plain_http=registry.plain_http,
        )
        return SwarmRuntime(home, host, registry.path, options, nodes=nodes)
    raise KilnError(f"unknown runtime kind {kind!r}: use one of {', '.join(RUNTIME_KINDS)}")


@dataclass(frozen=True)
class Registry:
    """Where a Swarm's images go, and how to reach it (absolute paths; from ``[runtime]
    registry`` and ``[registries."HOST"]``)."""

    path: str
    ca: str | None = None
    auth_file: str | None = None
    plain_http: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ca": self.ca,
            "auth_file": self.auth_file,
            "plain_http": self.plain_http,
        }

    @classmethod
    def from_json(cls, data: Any) -> Registry | None:
        if not isinstance(data, dict) or not isinstance(data.get("path"), str):
            return None
        return cls(
            str(data["path"]),
            str(data["ca"]) if data.get("ca") else None,
            str(data["auth_file"]) if data.get("auth_file") else None,
            bool(data.get("plain_http")),
        )


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime a home's agent uses: recorded in ``KILN_HOME/runtime.json`` by the first
    agent, so every later agent (and ``kiln down`` without one) opens the same."""

    kind: str = "local"
    host: str | None = None
    registry: Registry | None = None
    nodes: tuple[tuple[str, str], ...] = ()
    """A swarm's ``[runtime] nodes``: (node, its engine's address), sorted; a tuple so
    that the choice stays hashable."""

    def open(self, home: Path) -> Runtime:
        return open_runtime(
            home, self.kind, self.host, self.registry, dict(self.nodes) if self.nodes else None
        )

    def same_instances(self, other: RuntimeChoice) -> bool:
        """Whether both reach the same instances: the same runtime, engine and registry,
        whatever node engines (``nodes``) each reaches a swarm's tasks through."""
        return replace(self, nodes=()) == replace(other, nodes=())

    def describe(self) -> str:
        where = f" at {self.host}" if self.host else ""
        via = f" (images via {self.registry.path})" if self.registry else ""
        engines = f" with the engines of nodes {', '.join(n for n, _ in self.nodes)}"
        return self.kind + where + via + (engines if self.nodes else "")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "host": self.host,
            "registry": self.registry.to_json() if self.registry else None,
        }
        if self.nodes:
            data["nodes"] = dict(self.nodes)
        return data

    @classmethod
    def from_json(cls, data: Any) -> RuntimeChoice:
        """From a request's or ``runtime.json``'s ``runtime`` object."""
        if not isinstance(data, dict):
            return cls()
        host = data.get("host")
        nodes = data.get("nodes")
        return cls(
            str(data.get("kind") or "local"),
            str(host) if host else None,
            Registry.from_json(data.get("registry")),
            tuple(sorted((str(k), str(v)) for k, v in nodes.items()))
            if isinstance(nodes, dict)
            else (),
        )


def read_choice(home: Path) -> RuntimeChoice | None:
    try:
        data = json.loads((home / CHOICE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise KilnError(f"{home / CHOICE_FILE}: unreadable ({e}); remove it to choose again") from e
    if not isinstance(data, dict) or data.get("kind") not in RUNTIME_KINDS:
        raise KilnError(f"{home / CHOICE_FILE}: not a runtime choice; remove it to choose again")
    return RuntimeChoice.from_json(data)


def write_choice(home: Path, choice: RuntimeChoice) -> None:
    from kiln.paths import write_private

    write_private(home / CHOICE_FILE, json.dumps(choice.to_json()).encode())
