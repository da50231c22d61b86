"""The Kiln proxy process: ``python -m kiln.traffic.proxy --control SOCK [--state FILE]``.

It runs apart from the agent so the control plane can restart, crash or be
upgraded without dropping a request. The agent tells it the whole desired
route of a service over the control socket; the proxy acts only on the
difference. With ``--state`` it remembers the last routes it was given, so a
proxy restarted while the agent is down serves the same backends again.

Control API (HTTP/1.1 + JSON on the Unix socket, mode 0600):

* ``PUT /services/{name}`` — body ``{"listen", "protocol", "drain_timeout",
  "queue_timeout", "backends": [{"id", "address", "weight"}], "host"?}``;
  200 ``{"changed": bool}``; 400 on a bad document; 409 when the port is taken
  (the previous config keeps serving).
* ``DELETE /services/{name}`` — drain, then close the listener; 404 if unknown.
* ``GET /services``, ``GET /stats``, ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.traffic import _http as h
from kiln.traffic._forward import http_protocol, tcp_protocol
from kiln.traffic._routes import Route, RouteError
from kiln.traffic._service import ServiceState

log = logging.getLogger("kiln.traffic.proxy")

STATE_VERSION = 1


class PortInUse(Exception):
    """Binding a service's listen port failed; the message is the one the agent sees."""


class Proxy:
    """All services of one proxy process and the control API that changes them."""

    def __init__(self, host: str, state_file: Path | None) -> None:
        self.host = host
        self.state_file = state_file
        self.services: dict[str, ServiceState] = {}
        self.started = time.time()
        self._lock = asyncio.Lock()

    # -- desired state -----------------------------------------------------

    async def put(self, route: Route) -> bool:
        """Makes ``route`` the served config; returns whether anything changed."""
        async with self._lock:
            changed = await self._apply(route)
            if changed:
                self.save()
            return changed

    async def _apply(self, route: Route) -> bool:
        svc = self.services.get(route.name)
        if svc is not None and svc.route == route:
            return False
        rebind = (
            svc is None
            or svc.route.listen != route.listen
            or svc.route.protocol != route.protocol
            or svc.route.host != route.host
        )
        if rebind:
            for other in self.services.values():
                if other.name != route.name and other.route.listen == route.listen:
                    raise PortInUse(
                        f"listen port {route.listen} is in use by service {other.name!r}"
                    )
        if svc is None:
            svc = ServiceState(route)
            svc.server = await self._bind(svc, route)
            self.services[route.name] = svc
            log.info(
                "service added service=%s listen=%d protocol=%s backends=%d",
                route.name,
                route.listen,
                route.protocol,
                len(route.backends),
            )
            return True
        if rebind:
            old_server = svc.server
            same_port = svc.route.listen == route.listen
            if same_port and old_server is not None:
                old_server.close()
            try:
                server = await self._bind(svc, route)
            except PortInUse:
                if same_port:
                    svc.server = await self._bind(svc, svc.route)
                raise
            if not same_port and old_server is not None:
                old_server.close()
            svc.server = server
        svc.route = route
        svc.set_backends(route.backends, route.drain_timeout)
        log.info(
            "service updated service=%s listen=%d backends=%s",
            route.name,
            route.listen,
            ",".join(b.id for b in route.backends),
        )
        return True

    async def _bind(self, svc: ServiceState, route: Route) -> asyncio.Server:
        factory = http_protocol(svc) if route.protocol == "http" else tcp_protocol(svc)
        host = route.host or self.host
        try:
            return await asyncio.get_running_loop().create_server(
                factory, host, route.listen, reuse_address=True, backlog=1024
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"listen port {route.listen} is in use by another process") from e
            raise PortInUse(f"listen port {route.listen} on {host}: {e.strerror}") from e

    async def delete(self, name: str) -> bool:
        async with self._lock:
            svc = self.services.pop(name, None)
            if svc is None:
                return False
            svc.begin_close()
            log.info("service deleted service=%s", name)
            self.save()
            return True

    async def shutdown(self) -> None:
        """SIGTERM: stop accepting everywhere, let in-flight work finish, then return."""
        services = list(self.services.values())
        for svc in services:
            svc.begin_close()
        limit = max((s.route.drain_timeout for s in services), default=0.0)
        deadline = time.monotonic() + limit
        while any(s.busy() for s in services) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- persistence -------------------------------------------------------

    def save(self) -> None:
        if self.state_file is None:
            return
        doc = {
            "version": STATE_VERSION,
            "services": {n: s.route.to_json() for n, s in sorted(self.services.items())},
        }
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        data = json.dumps(doc, indent=2, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_file)

    async def restore(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            doc = json.loads(self.state_file.read_text())
            routes = [Route.from_json(n, d) for n, d in doc.get("services", {}).items()]
        except (OSError, ValueError, RouteError, AttributeError) as e:
            log.error("state file unreadable, starting empty file=%s error=%s", self.state_file, e)
            return
        for route in routes:
            try:
                await self._apply(route)
            except PortInUse as e:
                log.error("restore failed service=%s error=%s", route.name, e)

    # -- control API -------------------------------------------------------

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    break
                try:
                    req = h.parse_request(raw)
                    if req.framing == h.CHUNKED:
                        raise h.HTTPParseError("chunked bodies are not accepted here")
                except h.HTTPParseError as e:
                    writer.write(_json(400, {"error": str(e)}, close=True))
                    break
                body = await reader.readexactly(req.length) if req.framing == h.LENGTH else b""
                status, payload = await self.dispatch(req.method, req.target, body)
                writer.write(_json(status, payload, close=req.close))
                await writer.drain()
                if req.close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def dispatch(self, method: bytes, target: bytes, body: bytes) -> tuple[int, Any]:
        path = target.split(b"?", 1)[0].decode("latin-1").rstrip("/") or "/"
        if path == "/healthz" and method == b"GET":
            return 200, {
                "ok": True,
                "services": len(self.services),
                "uptime": time.time() - self.started,
            }
        if path == "/services" and method == b"GET":
            return 200, {n: s.to_json() for n, s in sorted(self.services.items())}
        if path == "/stats" and method == b"GET":
            return 200, {n: s.stats_json() for n, s in sorted(self.services.items())}
        if path.startswith("/services/") and path.count("/") == 2:
            name = path.removeprefix("/services/")
            if method == b"PUT":
                try:
                    route = Route.from_json(name, json.loads(body or b"null"))
                except ValueError as e:
                    return 400, {"error": f"services.{name}: body is not JSON: {e}"}
                except RouteError as e:
                    return 400, {"error": str(e)}
                try:
                    return 200, {"changed": await self.put(route)}
                except PortInUse as e:
                    return 409, {"error": str(e)}
            if method == b"DELETE":
                if await self.delete(name):
                    return 200, {"deleted": name}
                return 404, {"error": f"service {name!r} is not configured"}
            if method == b"GET":
                svc = self.services.get(name)
                if svc is None:
                    return 404, {"error": f"service {name!r} is not configured"}
                return 200, svc.to_json()
            return 405, {"error": f"method {method.decode('latin-1')} not allowed on {path}"}
        return 404, {"error": f"no such endpoint {method.decode('latin-1')} {path}"}


def _json(status: int, payload: Any, *, close: bool) -> bytes:
    return h.simple_response(
        status, json.dumps(payload).encode() + b"\n", content_type=b"application/json", close=close
    )


async def _serve_control(proxy: Proxy, path: Path) -> asyncio.Server:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(proxy.control, path=str(path), limit=1 << 22)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


async def run(control: Path, state: Path | None, host: str) -> int:
    proxy = Proxy(host, state)
    await proxy.restore()
    server = await _serve_control(proxy, control)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("proxy ready control=%s state=%s services=%d", control, state, len(proxy.services))
    await stop.wait()
    log.info("proxy stopping, draining")
    await proxy.shutdown()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        control.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln.traffic.proxy", description="Kiln's data-plane proxy."
    )
    parser.add_argument(
        "--control", type=Path, required=True, help="Unix socket for the control API"
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        help="file where the current routes are kept across restarts",
    )
    parser.add_argument(
        "--host", default="0.0.0.0", help="address the service listeners bind (default 0.0.0.0)"
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop when installed (auto), or force one",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        return runner.run(run(args.control, args.state, args.host))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop roughly doubles the proxy's throughput; it is optional, asyncio is the fallback."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("kiln proxy: --loop uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
