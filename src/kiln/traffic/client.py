"""The agent's side of the proxy's control socket, and the command that starts the proxy."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx

from kiln.errors import KilnError
from kiln.traffic._routes import Backend, Route

__all__ = ["Backend", "ProxyClient", "Route", "proxy_command"]


def proxy_command(control: Path, state: Path) -> list[str]:
    """The argument list that starts the proxy process (commands as data)."""
    return [
        sys.executable,
        "-m",
        "kiln.traffic.proxy",
        "--control",
        str(control),
        "--state",
        str(state),
    ]


class ProxyClient:
    """Speaks HTTP+JSON to ``python -m kiln.traffic.proxy`` over its Unix socket.

    Every failure is a ``KilnError`` naming the socket and, for a refused
    change, the proxy's own message (e.g. which port is taken).
    """

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://kiln-proxy",
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ProxyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise KilnError(f"proxy control socket {self.socket_path}: {e}") from e
        try:
            payload = resp.json()
        except ValueError:
            payload = {"error": resp.text.strip()}
        if resp.status_code >= 400:
            msg = payload.get("error") if isinstance(payload, dict) else None
            raise KilnError(f"proxy: {method} {path}: {msg or resp.status_code}")
        return payload

    def put_service(self, route: Route) -> None:
        self._call("PUT", f"/services/{route.name}", route.to_json())

    def delete_service(self, name: str) -> None:
        self._call("DELETE", f"/services/{name}")

    def services(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/services")
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/stats")
        return result

    def healthz(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/healthz")
        return result

    def wait_ready(self, timeout: float) -> None:
        """Blocks until the proxy answers ``/healthz``; raises KilnError after ``timeout``."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.healthz()
                return
            except KilnError as e:
                last = e
            time.sleep(0.05)
        raise KilnError(f"proxy on {self.socket_path} not ready after {timeout:g}s: {last}")
