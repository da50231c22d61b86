"""Moving bytes: the HTTP/1.1 reverse proxy and the TCP byte proxy.

The one promise this module keeps is that a request is only failed when
nothing else is safe. A request is retried on another attempt when the
backend never saw it (connect refused) or provably did not answer it (a
pooled keep-alive connection, or an idempotent request, closed before the
first response byte, with the request body still in hand). Requests with a
streamed body (chunked or larger than ``BUFFER_LIMIT``) go on a fresh
connection so the pooled-connection race cannot hit them.

Speed comes from doing the common exchange without a coroutine: a request
whose body is already in hand, sent on a pooled upstream connection and
answered with a Content-Length (or no) body, runs entirely on
``data_received`` callbacks — head parsed from the client's buffer, written
to the upstream, response head parsed from the upstream's buffer, body bytes
relayed as they arrive. Everything else (connecting, queueing, retries,
streamed and chunked bodies, responses until close) runs in a coroutine over
the same buffers, and the callback path hands over to it at the point where
it leaves the common case.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from kiln.traffic import _http as h
from kiln.traffic._conn import BufferedConn
from kiln.traffic._service import BackendState, ServiceState, Upstream, UpstreamListener

log = logging.getLogger("kiln.traffic.proxy")

BUFFER_LIMIT = 64 * 1024
CONNECT_TIMEOUT = 3.0
RETRY_PAUSE = 0.05
MAX_ATTEMPTS = 20
REQUEST_HEAD_LIMIT = h.MAX_HEAD + 4
RESPONSE_HEAD_LIMIT = 2 * 65536

_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_HEAD_END = b"\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_DROP_REQUEST = h.HOP_BY_HOP | {b"x-forwarded-for", b"x-forwarded-proto"}
_CLIENT_ERRORS = (ConnectionError, OSError, asyncio.IncompleteReadError, h.ChunkError)

# Phases of a client connection.
_IDLE = 0  # waiting for a request head
_AWAIT_HEAD = 1  # callbacks: request sent, waiting for the response head
_RELAY_BODY = 2  # callbacks: relaying a Content-Length response body
_COROUTINE = 3  # a coroutine owns the exchange
_AWAIT_WRITE = 4  # exchange over, waiting for the client to take what it was sent
_CLOSED = 5

monotonic = time.monotonic


class _UpstreamFailed(Exception):
    """The exchange with a backend broke before the client got any response byte."""


def _request_head(req: h.Head, client_ip: bytes, backend: BackendState) -> bytes:
    if req.hop or req.forwarded:
        drop = _DROP_REQUEST | req.connection_tokens if req.connection_tokens else _DROP_REQUEST
        block = b"".join(line + b"\r\n" for lname, line in req.lines if lname not in drop)
    else:
        block = req.block
    xff = req.xff + b", " + client_ip if req.xff else client_ip
    return b"".join(
        (
            req.method,
            b" ",
            req.target,
            b" HTTP/1.1\r\n",
            block,
            b"" if req.has_host else backend.host_header,
            b"X-Forwarded-For: ",
            xff,
            b"\r\nX-Forwarded-Proto: http\r\n\r\n",
        )
    )


def _response_head(resp: h.Head, keep: bool, client_version: int, backend: BackendState) -> bytes:
    dechunk = client_version == 10 and resp.framing == h.CHUNKED
    if resp.hop or dechunk:
        drop = h.HOP_BY_HOP | resp.connection_tokens if resp.connection_tokens else h.HOP_BY_HOP
        block = b"".join(
            line + b"\r\n"
            for lname, line in resp.lines
            if lname not in drop and not (dechunk and lname == b"transfer-encoding")
        )
    else:
        block = resp.block
    if not keep:
        connection = _CLOSE
    elif client_version == 10:
        connection = _KEEP_ALIVE
    else:
        connection = b""
    return b"".join(
        (b"HTTP/1.1 ", resp.target, b"\r\n", block, backend.id_header, connection, b"\r\n")
    )


def http_protocol(service: ServiceState) -> Callable[[], asyncio.Protocol]:
    """The protocol factory for an HTTP service's listener."""
    return lambda: HTTPClientConn(service)


def tcp_protocol(service: ServiceState) -> Callable[[], asyncio.Protocol]:
    """The protocol factory for a TCP service's listener."""
    return lambda: TCPClientConn(service)


class HTTPClientConn(BufferedConn, UpstreamListener):
    """One client connection of an HTTP service, request after request."""

    def __init__(self, service: ServiceState) -> None:
        super().__init__()
        self.service = service
        self.client_ip = b"unknown"
        self.phase = _IDLE
        self.req: h.Head | None = None
        self.resp: h.Head | None = None
        self.body = b""
        self.start = 0.0
        self.backend: BackendState | None = None
        self.up: Upstream | None = None
        self.left = 0
        self.answered = False
        self.keep = False
        self.task: asyncio.Task[None] | None = None  # held so it cannot be collected

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        self.service.clients.add(self)
        if self.service.closing:
            self._close()

    def data_received(self, data: bytes) -> None:
        if self.phase != _IDLE:
            super().data_received(data)
        elif (
            not self.buf
            and data.find(_HEAD_END) == len(data) - 4 >= 0
            and len(data) <= REQUEST_HEAD_LIMIT
            and not self.service.closing
        ):
            # Exactly one whole head and nothing else: no copy into the buffer.
            self._request(data)
        else:
            self.buf += data
            self._next()

    def eof_received(self) -> bool | None:
        super().eof_received()
        if self.phase == _IDLE:
            self._next()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.service.clients.discard(self)
        if self.phase == _AWAIT_WRITE:
            self.phase = _CLOSED
        elif self.phase == _RELAY_BODY:
            # The upstream may be paused behind this client: nothing else would end it.
            self._cut_mid_response()

    def waiting_for_request(self) -> bool:
        return self.phase == _IDLE

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.phase == _RELAY_BODY:
            self._relay_body()
        elif self.phase == _AWAIT_WRITE:
            self._idle()

    # -- requests ----------------------------------------------------------

    def _close(self) -> None:
        self.phase = _CLOSED
        self.service.clients.discard(self)
        self.close()

    def _refuse(self, status: int, message: bytes) -> None:
        self.write(h.simple_response(status, message, close=True))
        self._close()

    def _idle(self) -> None:
        self.phase = _IDLE
        if self.buf or self.eof or self.service.closing:
            self._next()
        elif self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def _next(self) -> None:
        """Starts the next request if its head is in the buffer, or ends the connection."""
        if self.closed:
            self.phase = _CLOSED
            return
        if self.service.closing:
            self._close()
            return
        buf = self.buf
        end = buf.find(_HEAD_END)
        if end < 0:
            if len(buf) > REQUEST_HEAD_LIMIT:
                self._refuse(431, b"request head over 64 KiB\n")
            elif self.eof:
                if buf.strip():
                    self._refuse(400, b"incomplete request\n")
                else:
                    self._close()
            elif self.read_paused:
                self.read_paused = False
                self.transport.resume_reading()
            return
        if end > REQUEST_HEAD_LIMIT:
            self._refuse(431, b"request head over 64 KiB\n")
            return
        end += 4
        raw = bytes(buf[:end])
        del buf[:end]
        self._request(raw)

    def _request(self, raw: bytes) -> None:
        self.phase = _COROUTINE  # busy until the dispatch below says how
        try:
            req = h.parse_request(raw)
        except h.HTTPParseError as e:
            self._refuse(400, f"{e}\n".encode())
            return
        self.start = monotonic()
        buf = self.buf
        framing = req.framing
        if framing == h.NO_BODY:
            body = b""
        elif (
            framing == h.LENGTH
            and len(buf) >= req.length
            and req.length <= BUFFER_LIMIT
            and not req.expect_continue
        ):
            body = bytes(buf[: req.length])
            del buf[: req.length]
            self.consumed()
        else:
            self._run(self._exchange(req, None, True, None))
            return
        service = self.service
        backend = service.pick(None)
        if backend is None:
            self._run(self._exchange(req, body, False, None))
            return
        up = backend.take_idle()
        if up is None:
            self._run(self._exchange(req, body, False, backend))
            return
        # The common case, on callbacks from here on.
        backend.active += 1
        backend.stats.requests += 1
        self.phase = _AWAIT_HEAD
        self.req = req
        self.body = body
        self.backend = backend
        self.up = up
        self.answered = False
        up.listener = self
        head = _request_head(req, self.client_ip, backend)
        up.write(head + body if body else head)

    def _run(self, exchange: Coroutine[Any, Any, bool]) -> None:
        self.phase = _COROUTINE
        self.task = asyncio.get_running_loop().create_task(self._finish(exchange))

    async def _finish(self, exchange: Coroutine[Any, Any, bool]) -> None:
        try:
            keep = await exchange
        except _CLIENT_ERRORS:
            keep = False
        except Exception:
            log.exception("exchange failed service=%s", self.service.name)
            keep = False
        self._done(keep)

    def _done(self, keep: bool) -> None:
        """The exchange is over; the connection serves the next request or closes."""
        self.req = self.resp = self.backend = self.up = None
        self.task = None
        self.body = b""
        if not keep or self.closed or self.service.closing:
            self._close()
        elif self.write_paused:
            self.phase = _AWAIT_WRITE
        else:
            self._idle()

    # -- the callback path -------------------------------------------------

    def upstream_data(self) -> None:
        if self.phase == _AWAIT_HEAD:
            self._response_head()
        elif self.phase == _RELAY_BODY:
            self._relay_body()

    def _response_head(self) -> None:
        up = self.up
        req = self.req
        backend = self.backend
        assert up is not None and req is not None and backend is not None
        buf = up.buf
        self.answered = True
        while True:
            end = buf.find(_HEAD_END)
            if end < 0:
                if len(buf) > RESPONSE_HEAD_LIMIT:
                    self._invalid_response(backend, up)
                return
            end += 4
            raw = bytes(buf[:end])
            del buf[:end]
            try:
                resp = h.parse_response(raw, req.method)
            except h.HTTPParseError:
                self._invalid_response(backend, up)
                return
            if resp.status >= 200 or resp.status == 101:
                break
            if req.version == 11:
                self.write(raw)
        if resp.status == 101:
            up.listener = None
            backend.discard(up)
            backend.finished()
            self.write(h.simple_response(502, b"protocol upgrades are not supported\n", close=True))
            self._done(False)
            return
        keep = not req.close and not self.service.closing
        framing = resp.framing
        if framing == h.UNTIL_CLOSE or framing == h.CHUNKED:
            # Rare shapes: a coroutine relays them over the same buffers.
            up.listener = None
            self._run(self._relay_then_finish(req, resp, backend, up))
            return
        self.resp = resp
        self.keep = keep
        out = _response_head(resp, keep, req.version, backend)
        if framing == h.NO_BODY:
            self.write(out)
            self._exchange_done()
            return
        left = resp.length
        n = len(buf)
        if n == 0:
            self.write(out)
        elif n <= left:
            self.write(out + buf)
            buf.clear()
            left -= n
        else:
            self.write(out + buf[:left])
            del buf[:left]
            left = 0
        self.left = left
        if left == 0:
            self._exchange_done()
        else:
            up.consumed()
            self.phase = _RELAY_BODY

    def _relay_body(self) -> None:
        up = self.up
        assert up is not None
        if self.closed:
            self._cut_mid_response()
            return
        if self.write_paused:
            return
        buf = up.buf
        n = len(buf)
        if n:
            left = self.left
            if n <= left:
                self.transport.write(bytes(buf))
                buf.clear()
                self.left = left - n
            else:
                self.transport.write(bytes(buf[:left]))
                del buf[:left]
                self.left = 0
            up.consumed()
        if self.left == 0:
            self._exchange_done()

    def _exchange_done(self) -> None:
        up, backend, resp = self.up, self.backend, self.resp
        assert up is not None and backend is not None and resp is not None
        backend.stats.observe(resp.status, monotonic() - self.start)
        backend.release(up, not resp.close and resp.version == 11)
        backend.finished()
        self._done(self.keep)

    def _invalid_response(self, backend: BackendState, up: Upstream) -> None:
        up.listener = None
        backend.discard(up)
        backend.stats.errors_reset += 1
        self.write(h.simple_response(502, b"backend sent an invalid response\n", close=True))
        backend.stats.observe(502, monotonic() - self.start)
        backend.finished()
        self._done(False)

    def _cut_mid_response(self) -> None:
        up, backend, resp = self.up, self.backend, self.resp
        assert up is not None and backend is not None and resp is not None
        up.listener = None
        backend.discard(up)
        backend.stats.errors_reset += 1
        backend.stats.observe(resp.status, monotonic() - self.start)
        backend.finished()
        self._done(False)

    def upstream_closed(self) -> None:
        up, backend, req = self.up, self.backend, self.req
        assert up is not None and backend is not None and req is not None
        if self.phase == _RELAY_BODY:
            # Whatever arrived before the end is still relayed; then the client is cut.
            self._relay_body()
            if self.phase == _RELAY_BODY:
                self._cut_mid_response()
            return
        if self.phase != _AWAIT_HEAD:
            return
        partial = self.answered
        backend.discard(up)
        backend.stats.errors_reset += 1
        backend.finished()
        # A pooled connection closed before any response byte: the backend did not
        # act on the request, so it goes again on a fresh connection. A draining
        # backend cut at drain_timeout is a deliberate end, not a retry case.
        if not partial and not backend.draining:
            self._run(self._exchange(req, self.body, False, None, fresh_only=True, attempts=1))
            return
        self.write(h.simple_response(502, b"backend closed the connection\n", close=True))
        backend.stats.observe(502, monotonic() - self.start)
        self._done(False)

    async def _relay_then_finish(
        self, req: h.Head, resp: h.Head, backend: BackendState, up: Upstream
    ) -> bool:
        try:
            return await self._relay(req, resp, backend, up)
        finally:
            backend.finished()

    # -- the coroutine path ------------------------------------------------

    async def _exchange(
        self,
        req: h.Head,
        body: bytes | None,
        read_body: bool,
        first: BackendState | None,
        *,
        fresh_only: bool = False,
        attempts: int = 0,
    ) -> bool:
        """Forwards one request; returns whether the client connection stays open.

        ``read_body`` says the body is still in the client's buffer; ``first`` is a
        backend already picked for the first attempt.
        """
        service = self.service
        start = self.start
        if read_body:
            body = b""
            if req.framing != h.NO_BODY:
                if req.expect_continue:
                    self.write(_CONTINUE)
                if req.framing == h.LENGTH and req.length <= BUFFER_LIMIT:
                    body = await self.read_exactly(req.length)
                else:
                    body = None
        deadline = start + service.route.queue_timeout
        tried: set[str] = set()
        while True:
            backend = first if first is not None else service.pick(tried)
            first = None
            if backend is None:
                remaining = deadline - monotonic()
                if remaining <= 0 or attempts >= MAX_ATTEMPTS or service.closing:
                    return self._unavailable(body is not None and not req.close, tried)
                if tried:
                    await service.wait_change(min(remaining, RETRY_PAUSE))
                    tried.clear()
                else:
                    await service.wait_change(remaining)
                continue
            attempts += 1
            backend.active += 1
            try:
                result = await self._attempt(req, body, backend, fresh_only)
            except _UpstreamFailed as e:
                if e.args and e.args[0]:
                    fresh_only = True
                else:
                    tried.add(backend.spec.id)
                continue
            finally:
                backend.finished()
            return result and not req.close and not service.closing

    def _unavailable(self, keep: bool, tried: set[str]) -> bool:
        self.service.unrouted += 1
        if tried:
            msg = f"service {self.service.name}: every backend failed\n"
            status = 502
        else:
            msg = f"service {self.service.name}: no backend available\n"
            status = 503
        self.write(h.simple_response(status, msg.encode(), close=not keep))
        return keep

    async def _attempt(
        self, req: h.Head, body: bytes | None, backend: BackendState, fresh_only: bool
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
        head = _request_head(req, self.client_ip, backend)
        try:
            if body is not None:
                up.write(head + body if body else head)
            else:
                up.write(head)
                if req.framing == h.CHUNKED:
                    await h.copy_chunked(self, up)
                else:
                    await h.copy_length(self, up, req.length)
            raw = await up.read_until(_HEAD_END, RESPONSE_HEAD_LIMIT)
            resp = h.parse_response(raw, req.method)
            while resp.status < 200 and resp.status != 101:
                if req.version == 11:
                    self.write(raw)
                raw = await up.read_until(_HEAD_END, RESPONSE_HEAD_LIMIT)
                resp = h.parse_response(raw, req.method)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            backend.discard(up)
            stats.errors_reset += 1
            partial = isinstance(e, asyncio.IncompleteReadError) and bool(e.partial)
            # A draining backend cut at drain_timeout is a deliberate end, not a retry case.
            retry = body is not None and not partial and not backend.draining
            if retry and (reused or req.method in h.IDEMPOTENT):
                raise _UpstreamFailed(reused) from e
            self.write(h.simple_response(502, b"backend closed the connection\n", close=True))
            stats.observe(502, monotonic() - self.start)
            return False
        except (h.HTTPParseError, asyncio.LimitOverrunError, h.ChunkError):
            backend.discard(up)
            stats.errors_reset += 1
            self.write(h.simple_response(502, b"backend sent an invalid response\n", close=True))
            stats.observe(502, monotonic() - self.start)
            return False

        if resp.status == 101:
            backend.discard(up)
            self.write(h.simple_response(502, b"protocol upgrades are not supported\n", close=True))
            return False
        return await self._relay(req, resp, backend, up)

    async def _relay(self, req: h.Head, resp: h.Head, backend: BackendState, up: Upstream) -> bool:
        """Sends the response head and relays its body; returns whether the client stays."""
        stats = backend.stats
        keep = not req.close and not self.service.closing
        framing = resp.framing
        if framing == h.UNTIL_CLOSE or (framing == h.CHUNKED and req.version == 10):
            keep = False
        self.write(_response_head(resp, keep, req.version, backend))
        try:
            if framing == h.LENGTH:
                await h.copy_length(up, self, resp.length)
            elif framing == h.CHUNKED:
                await h.copy_chunked(up, self, dechunk=req.version == 10)
            elif framing == h.UNTIL_CLOSE:
                await h.copy_until_close(up, self)
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
            stats.observe(resp.status, monotonic() - self.start)
            return False
        stats.observe(resp.status, monotonic() - self.start)
        backend.release(up, not resp.close and resp.version == 11 and framing != h.UNTIL_CLOSE)
        return keep


class TCPClientConn(BufferedConn):
    """Relays one client connection of a TCP service to one backend, both directions."""

    def __init__(self, service: ServiceState) -> None:
        super().__init__()
        self.service = service
        self.task: asyncio.Task[None] | None = None  # held so it cannot be collected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.service.clients.add(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        service = self.service
        try:
            backend, up = await self._connect()
            if backend is None or up is None:
                service.unrouted += 1
                return
            stats = backend.stats
            stats.connections += 1
            try:
                await asyncio.gather(
                    self._pump(self, up, backend, True),
                    self._pump(up, self, backend, False),
                )
            finally:
                backend.discard(up)
                backend.finished()
        finally:
            service.clients.discard(self)
            self.abort()

    async def _connect(self) -> tuple[BackendState | None, Upstream | None]:
        service = self.service
        deadline = monotonic() + service.route.queue_timeout
        tried: set[str] = set()
        while not service.closing:
            backend = service.pick(tried)
            if backend is None:
                remaining = deadline - monotonic()
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
        src: BufferedConn, dst: BufferedConn, backend: BackendState, inbound: bool
    ) -> None:
        stats = backend.stats
        try:
            while True:
                data = await src.read_some()
                if not data:
                    break
                if inbound:
                    stats.bytes_in += len(data)
                else:
                    stats.bytes_out += len(data)
                dst.write(data)
                if dst.write_paused:
                    await dst.drain()
            transport = dst.transport
            if not dst.closed and not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()
        except (ConnectionError, OSError):
            stats.errors_reset += 1
            dst.abort()
