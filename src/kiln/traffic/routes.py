"""What the engine asks of the data plane: one ``Route`` per service.

A route is the whole desired state of a service's listener: where it listens,
in which mode, and its backends with their weight and state. Every name and
address is validated here, before it can reach a proxy's configuration or
runtime API, where a space, a newline or a semicolon would be a command.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.errors import KilnError

__all__ = ["PROTOCOLS", "STATES", "Backend", "BackendState", "Route", "RouteError"]

PROTOCOLS = ("http", "tcp")
STATES = ("ready", "draining", "maintenance")
BackendState = Literal["ready", "draining", "maintenance"]
MAX_WEIGHT = 256
MAX_SECONDS = 2_147_483
"""HAProxy's largest timeout (2^31 - 1 ms)."""
"""HAProxy's own range for a server weight (0-256)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class RouteError(KilnError):
    """A route the data plane cannot serve; the message names the key."""


@dataclass(frozen=True)
class Backend:
    """One instance behind a service: ``ready`` takes new requests, ``draining``
    finishes what it has, ``maintenance`` gets nothing."""

    id: str
    address: str
    weight: int = 100
    state: BackendState = "ready"

    def __post_init__(self) -> None:
        where = f"backend {self.id!r}"
        if not _NAME.fullmatch(self.id):
            raise RouteError(f"{where}: id must match {_NAME.pattern}")
        if not valid_address(self.address):
            raise RouteError(f"{where}: address must be 'IP:port', got {self.address!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int):
            raise RouteError(f"{where}: weight must be an integer, got {self.weight!r}")
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise RouteError(f"{where}: weight must be 0-{MAX_WEIGHT}, got {self.weight}")
        if self.state not in STATES:
            raise RouteError(f"{where}: state must be one of {', '.join(STATES)}")

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address, "weight": self.weight, "state": self.state}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Backend:
        if not isinstance(data, dict):
            raise RouteError(f"{where}: must be an object")
        try:
            return cls(
                id=str(data.get("id", "")),
                address=str(data.get("address", "")),
                weight=data.get("weight", 100),
                state=data.get("state", "ready"),
            )
        except RouteError as e:
            raise RouteError(f"{where}: {e}") from e


@dataclass(frozen=True)
class Route:
    """The desired state of one service's listener and backends."""

    name: str
    listen: int
    protocol: str = "http"
    backends: tuple[Backend, ...] = field(default_factory=tuple)
    drain_timeout: float = 10.0
    queue_timeout: float = 5.0

    def __post_init__(self) -> None:
        where = f"service {self.name!r}"
        if not _NAME.fullmatch(self.name):
            raise RouteError(f"{where}: name must match {_NAME.pattern}")
        if isinstance(self.listen, bool) or not isinstance(self.listen, int):
            raise RouteError(f"{where}: listen must be a port 1-65535, got {self.listen!r}")
        if not 0 < self.listen < 65536:
            raise RouteError(f"{where}: listen must be a port 1-65535, got {self.listen}")
        if self.protocol not in PROTOCOLS:
            raise RouteError(f"{where}: protocol must be 'http' or 'tcp', got {self.protocol!r}")
        for key in ("drain_timeout", "queue_timeout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RouteError(f"{where}: {key} must be a number of seconds, got {value!r}")
            if not 0 <= value <= MAX_SECONDS:  # also refuses NaN
                raise RouteError(f"{where}: {key} must be 0-{MAX_SECONDS} seconds, got {value!r}")
        seen: set[str] = set()
        dupes: list[str] = []
        for b in self.backends:
            if b.id in seen:
                dupes.append(b.id)
            seen.add(b.id)
        dupes.sort()
        if dupes:
            raise RouteError(f"{where}: duplicate backend id {dupes[0]!r}")

    def backend(self, backend_id: str) -> Backend | None:
        return next((b for b in self.backends if b.id == backend_id), None)

    def same_listener(self, other: Route) -> bool:
        """Whether ``other`` differs only in what changes at run time: its backends and
        the drain deadline (the engine's, not the proxy's)."""
        return (self.listen, self.protocol, self.queue_timeout) == (
            other.listen,
            other.protocol,
            other.queue_timeout,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "protocol": self.protocol,
            "drain_timeout": self.drain_timeout,
            "queue_timeout": self.queue_timeout,
            "backends": [b.to_json() for b in self.backends],
        }

    @classmethod
    def from_json(cls, data: Any) -> Route:
        if not isinstance(data, dict):
            raise RouteError("route: must be an object")
        raw = data.get("backends", [])
        if not isinstance(raw, list):
            raise RouteError("route.backends: must be a list")
        return cls(
            name=str(data.get("name", "")),
            listen=data.get("listen"),  # type: ignore[arg-type]
            protocol=str(data.get("protocol", "http")),
            drain_timeout=data.get("drain_timeout", 10.0),
            queue_timeout=data.get("queue_timeout", 5.0),
            backends=tuple(Backend.from_json(b, f"backends[{i}]") for i, b in enumerate(raw)),
        )


@functools.lru_cache(maxsize=65536)
def valid_address(address: str) -> bool:
    """``IP:port`` or ``[IPv6]:port`` only: a host name would make the proxy resolve DNS.

    Cached: a route of a thousand backends is rebuilt on every change of one of them."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or port != str(int(port)):
        return False
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not host or not all(c in "0123456789abcdefABCDEF.:" for c in host):
        return False  # a scope id (``%eth0``) could carry any character into a config file
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return bracketed == (ip.version == 6)
