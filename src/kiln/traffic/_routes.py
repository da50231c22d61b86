"""The route model shared by the proxy process and its client.

Both sides parse the same JSON with the same code, so a route the client can
build is exactly a route the proxy accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError

PROTOCOLS = ("http", "tcp")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class RouteError(KilnError):
    """A route document the proxy cannot serve; the message names the key."""


@dataclass(frozen=True)
class Backend:
    id: str
    address: str
    weight: int = 100

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address, "weight": self.weight}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Backend:
        if not isinstance(data, dict):
            raise RouteError(f"{where}: must be an object")
        bid = data.get("id")
        if not isinstance(bid, str) or not bid:
            raise RouteError(f"{where}.id: must be a non-empty string")
        address = data.get("address")
        if not isinstance(address, str) or not _valid_address(address):
            raise RouteError(f"{where}.address: must be 'host:port', got {address!r}")
        weight = data.get("weight", 100)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise RouteError(f"{where}.weight: must be an integer ≥ 0, got {weight!r}")
        return cls(id=bid, address=address, weight=weight)


@dataclass(frozen=True)
class Route:
    """The whole desired state of one service's listener, as PUT to the proxy."""

    name: str
    listen: int
    protocol: str = "http"
    drain_timeout: float = 10.0
    queue_timeout: float = 5.0
    backends: tuple[Backend, ...] = field(default_factory=tuple)
    host: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The PUT body; the name travels in the URL."""
        body: dict[str, Any] = {
            "listen": self.listen,
            "protocol": self.protocol,
            "drain_timeout": self.drain_timeout,
            "queue_timeout": self.queue_timeout,
            "backends": [b.to_json() for b in self.backends],
        }
        if self.host is not None:
            body["host"] = self.host
        return body

    @classmethod
    def from_json(cls, name: str, data: Any) -> Route:
        if not _NAME.match(name):
            raise RouteError(f"service name {name!r}: must match {_NAME.pattern}")
        if not isinstance(data, dict):
            raise RouteError(f"services.{name}: body must be a JSON object")
        where = f"services.{name}"
        known = {"listen", "protocol", "drain_timeout", "queue_timeout", "backends", "host"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RouteError(f"{where}.{unknown[0]}: unknown key")
        listen = data.get("listen")
        if isinstance(listen, bool) or not isinstance(listen, int) or not 0 < listen < 65536:
            raise RouteError(f"{where}.listen: must be a port 1-65535, got {listen!r}")
        protocol = data.get("protocol", "http")
        if protocol not in PROTOCOLS:
            raise RouteError(f"{where}.protocol: must be 'http' or 'tcp', got {protocol!r}")
        drain = _seconds(data.get("drain_timeout", 10.0), f"{where}.drain_timeout")
        queue = _seconds(data.get("queue_timeout", 5.0), f"{where}.queue_timeout")
        host = data.get("host")
        if host is not None and not isinstance(host, str):
            raise RouteError(f"{where}.host: must be a string")
        raw_backends = data.get("backends", [])
        if not isinstance(raw_backends, list):
            raise RouteError(f"{where}.backends: must be a list")
        backends = tuple(
            Backend.from_json(b, f"{where}.backends[{i}]") for i, b in enumerate(raw_backends)
        )
        ids = [b.id for b in backends]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise RouteError(f"{where}.backends: duplicate id {dupes[0]!r}")
        return cls(
            name=name,
            listen=listen,
            protocol=protocol,
            drain_timeout=drain,
            queue_timeout=queue,
            backends=backends,
            host=host,
        )


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise RouteError(f"{where}: must be a number of seconds ≥ 0, got {value!r}")
    return float(value)


def _valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
