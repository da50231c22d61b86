"""Moving bytes: the HTTP/1.1 reverse proxy and the TCP byte proxy.

The one promise this module keeps is that a request is only failed when
nothing else is safe. A request is retried on another attempt when the
backend never saw it (connect refused) or provably did not answer it (a
pooled keep-alive connection, or an idempotent request, closed before the
first response byte, with the request body still in hand). Requests with a
streamed body (chunked or larger than ``BUFFER_LIMIT``) go on a fresh
connection so the pooled-connection race cannot hit them.
"""

from __future__ import annotations

import asyncio
import time

from kiln.traffic import _http as h
from kiln.traffic._service import BackendState, ServiceState, Upstream

BUFFER_LIMIT = 64 * 1024
CONNECT_TIMEOUT = 3.0
RETRY_PAUSE = 0.05
MAX_ATTEMPTS = 20

_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"


class _UpstreamFailed(Exception):
    """The exchange with a backend broke before the client got any response byte."""


def _request_head(req: h.Head, client_ip: bytes, backend: BackendState) -> bytes:
    drop = h.HOP_BY_HOP | req.connection_tokens if req.connection_tokens else h.HOP_BY_HOP
    parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
    for lname, line in req.lines:
        if lname in drop or lname == b"x-forwarded-for" or lname == b"x-forwarded-proto":
            continue
        parts.append(line)
        parts.append(b"\r\n")
    if not req.has_host:
        parts.append(b"Host: " + backend.spec.address.encode() + b"\r\n")
    xff = req.xff + b", " + client_ip if req.xff else client_ip
    parts.append(b"X-Forwarded-For: " + xff + b"\r\nX-Forwarded-Proto: http\r\n\r\n")
    return b"".join(parts)


def _response_head(resp: h.Head, keep: bool, client_version: int, backend_id: bytes) -> bytes:
    drop = h.HOP_BY_HOP | resp.connection_tokens if resp.connection_tokens else h.HOP_BY_HOP
    dechunk = client_version == 10 and resp.framing == h.CHUNKED
    parts = [b"HTTP/1.1 ", resp.target, b"\r\n"]
    for lname, line in resp.lines:
        if lname in drop or (dechunk and lname == b"transfer-encoding"):
            continue
        parts.append(line)
        parts.append(b"\r\n")
    parts.append(b"X-Kiln-Backend: " + backend_id + b"\r\n")
    if not keep:
        parts.append(_CLOSE)
    elif client_version == 10:
        parts.append(_KEEP_ALIVE)
    parts.append(b"\r\n")
    return b"".join(parts)


class HTTPForwarder:
    """Serves one client connection of an HTTP service, request after request."""

    def __init__(self, service: ServiceState) -> None:
        self.service = service

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        service = self.service
        clients = service.clients
        peer = writer.get_extra_info("peername")
        client_ip = str(peer[0]).encode() if peer else b"unknown"
        clients[writer] = True
        try:
            while not service.closing:
                clients[writer] = True
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as e:
                    if e.partial.strip():
                        writer.write(h.simple_response(400, b"incomplete request\n", close=True))
                    break
                except asyncio.LimitOverrunError:
                    writer.write(h.simple_response(431, b"request head over 64 KiB\n", close=True))
                    break
                clients[writer] = False
                try:
                    req = h.parse_request(raw)
                except h.HTTPParseError as e:
                    writer.write(h.simple_response(400, f"{e}\n".encode(), close=True))
                    break
                if not await self.exchange(req, reader, writer, client_ip):
                    break
        except (ConnectionError, OSError, asyncio.IncompleteReadError, h.ChunkError):
            pass
        finally:
            clients.pop(writer, None)
            writer.close()

    async def exchange(
        self,
        req: h.Head,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_ip: bytes,
    ) -> bool:
        """Forwards one request; returns whether the client connection stays open."""
        service = self.service
        start = time.monotonic()
        body: bytes | None = b""
        if req.framing != h.NO_BODY:
            if req.expect_continue:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if req.framing == h.LENGTH and req.length <= BUFFER_LIMIT:
                body = await reader.readexactly(req.length)
            else:
                body = None
        deadline = start + service.route.queue_timeout
        tried: set[str] = set()
        fresh_only = False
        attempts = 0
        while True:
            backend = service.pick(tried)
            if backend is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or attempts >= MAX_ATTEMPTS or service.closing:
                    return self._unavailable(writer, body is not None and not req.close, tried)
                if tried:
                    await service.wait_change(min(remaining, RETRY_PAUSE))
                    tried.clear()
                else:
                    await service.wait_change(remaining)
                continue
            attempts += 1
            backend.active += 1
            try:
                result = await self._attempt(
                    req, body, backend, reader, writer, client_ip, start, fresh_only
                )
            except _UpstreamFailed as e:
                if e.args and e.args[0]:
                    fresh_only = True
                else:
                    tried.add(backend.spec.id)
                continue
            finally:
                backend.finished()
            return result and not req.close and not service.closing

    def _unavailable(self, writer: asyncio.StreamWriter, keep: bool, tried: set[str]) -> bool:
        self.service.unrouted += 1
        if tried:
            msg = f"service {self.service.name}: every backend failed\n"
            status = 502
        else:
            msg = f"service {self.service.name}: no backend available\n"
            status = 503
        writer.write(h.simple_response(status, msg.encode(), close=not keep))
        return keep

    async def _attempt(
        self,
        req: h.Head,
        body: bytes | None,
        backend: BackendState,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_ip: bytes,
        start: float,
        fresh_only: bool,
    ) -> bool:
        """One try on one backend. Raises ``_UpstreamFailed(retry_same)`` when retrying is safe."""
        stats = backend.stats
        up = None if (body is None or fresh_only) else backend.take_idle()
        reused = up is not None
        if up is None:
            try:
                up = await backend.connect(CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                stats.errors_connect += 1
                raise _UpstreamFailed(False) from e
        stats.requests += 1
        head = _request_head(req, client_ip, backend)
        uw = up.writer
        ur = up.reader
        try:
            if body is not None:
                uw.write(head + body if body else head)
            else:
                uw.write(head)
                if req.framing == h.CHUNKED:
                    await h.copy_chunked(reader, uw)
                else:
                    await h.copy_length(reader, uw, req.length)
            raw = await ur.readuntil(b"\r\n\r\n")
            resp = h.parse_response(raw, req.method)
            while resp.status < 200 and resp.status != 101:
                if req.version == 11:
                    writer.write(raw)
                raw = await ur.readuntil(b"\r\n\r\n")
                resp = h.parse_response(raw, req.method)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            backend.discard(up)
            stats.errors_reset += 1
            partial = isinstance(e, asyncio.IncompleteReadError) and bool(e.partial)
            # A draining backend cut at drain_timeout is a deliberate end, not a retry case.
            retry = body is not None and not partial and not backend.draining
            if retry and (reused or req.method in h.IDEMPOTENT):
                raise _UpstreamFailed(reused) from e
            writer.write(h.simple_response(502, b"backend closed the connection\n", close=True))
            stats.observe(502, time.monotonic() - start)
            return False
        except (h.HTTPParseError, asyncio.LimitOverrunError, h.ChunkError):
            backend.discard(up)
            stats.errors_reset += 1
            writer.write(h.simple_response(502, b"backend sent an invalid response\n", close=True))
            stats.observe(502, time.monotonic() - start)
            return False

        if resp.status == 101:
            backend.discard(up)
            writer.write(
                h.simple_response(502, b"protocol upgrades are not supported\n", close=True)
            )
            return False
        keep = not req.close and not self.service.closing
        framing = resp.framing
        if framing == h.UNTIL_CLOSE or (framing == h.CHUNKED and req.version == 10):
            keep = False
        out = _response_head(resp, keep, req.version, backend.spec.id.encode())
        try:
            if framing == h.NO_BODY:
                writer.write(out)
            elif framing == h.LENGTH:
                if resp.length <= BUFFER_LIMIT:
                    writer.write(out + await ur.readexactly(resp.length))
                else:
                    writer.write(out)
                    await h.copy_length(ur, writer, resp.length)
            elif framing == h.CHUNKED:
                writer.write(out)
                await h.copy_chunked(ur, writer, dechunk=req.version == 10)
            else:
                writer.write(out)
                await h.copy_until_close(ur, writer)
        except (
            ConnectionError,
            OSError,
            asyncio.IncompleteReadError,
            h.ChunkError,
            asyncio.LimitOverrunError,
        ):
            # Mid-response: the client already has part of it; closing is all that is left.
            backend.discard(up)
            stats.errors_reset += 1
            stats.observe(resp.status, time.monotonic() - start)
            return False
        stats.observe(resp.status, time.monotonic() - start)
        backend.release(up, not resp.close and resp.version == 11 and framing != h.UNTIL_CLOSE)
        if writer.transport.get_write_buffer_size() > 256 * 1024:
            await writer.drain()
        return keep


class TCPForwarder:
    """Relays one client connection of a TCP service to one backend, both directions."""

    def __init__(self, service: ServiceState) -> None:
        self.service = service

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        service = self.service
        service.clients[writer] = False
        try:
            backend, up = await self._connect()
            if backend is None or up is None:
                service.unrouted += 1
                return
            stats = backend.stats
            stats.connections += 1
            try:
                await asyncio.gather(
                    self._pump(reader, up.writer, backend, True),
                    self._pump(up.reader, writer, backend, False),
                )
            finally:
                backend.discard(up)
                backend.finished()
        finally:
            service.clients.pop(writer, None)
            writer.transport.abort()

    async def _connect(self) -> tuple[BackendState | None, Upstream | None]:
        service = self.service
        deadline = time.monotonic() + service.route.queue_timeout
        tried: set[str] = set()
        while not service.closing:
            backend = service.pick(tried)
            if backend is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None, None
                await service.wait_change(min(remaining, RETRY_PAUSE) if tried else remaining)
                tried.clear()
                continue
            backend.active += 1
            try:
                return backend, await backend.connect(CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                backend.stats.errors_connect += 1
                tried.add(backend.spec.id)
                backend.finished()
        return None, None

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        backend: BackendState,
        inbound: bool,
    ) -> None:
        stats = backend.stats
        try:
            while True:
                data = await src.read(256 * 1024)
                if not data:
                    break
                if inbound:
                    stats.bytes_in += len(data)
                else:
                    stats.bytes_out += len(data)
                dst.write(data)
                if dst.transport.get_write_buffer_size() > 256 * 1024:
                    await dst.drain()
            if dst.can_write_eof() and not dst.transport.is_closing():
                dst.write_eof()
        except (ConnectionError, OSError):
            stats.errors_reset += 1
            dst.transport.abort()
