"""One TCP connection as an asyncio Protocol with its own receive buffer.

Both sides of the proxy (client connections and upstream connections) are
``BufferedConn``s. The hot HTTP path reacts to ``data_received`` callbacks
and takes bytes straight out of ``buf``; the rarer paths (streamed bodies,
retries, queueing, TCP relaying) are coroutines that await the same buffer
through ``read_until``/``read_exactly``/``read_some``. Sharing one buffer is
what lets an exchange start on callbacks and finish in a coroutine without
losing a byte.

Flow control: reading pauses when ``buf`` holds more than ``HIGH_WATER``
unconsumed bytes and resumes once a consumer takes it below ``LOW_WATER``
(or starts waiting for more). Writers call ``drain`` (coroutines) or look at
``write_paused`` (callbacks) when the peer's kernel buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import cast

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
READ_CHUNK = 256 * 1024


class BufferedConn(asyncio.Protocol):
    """A connection whose received bytes wait in ``buf`` until a consumer takes them."""

    def __init__(self) -> None:
        self.transport = cast(asyncio.Transport, None)
        self.buf = bytearray()
        self.eof = False
        self.closed = False
        self.error: Exception | None = None
        self.write_paused = False
        self.read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > HIGH_WATER and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        self.wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self.wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        if exc is not None:
            self.error = exc
        self.wake()
        self._wake_drain()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    def waiting_for_request(self) -> bool:
        """Idle between requests: safe to close at shutdown without cutting anything."""
        return False

    # -- for consumers -----------------------------------------------------

    def wake(self) -> None:
        fut = self._waiter
        if fut is not None:
            self._waiter = None
            if not fut.done():
                fut.set_result(None)

    def _wake_drain(self) -> None:
        fut = self._drain_waiter
        if fut is not None:
            self._drain_waiter = None
            if not fut.done():
                fut.set_result(None)

    def consumed(self) -> None:
        """Called after taking bytes from ``buf``: reading resumes below the low mark."""
        if self.read_paused and len(self.buf) <= LOW_WATER and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            self.transport.abort()

    async def _wait(self) -> None:
        if self.read_paused and not self.closed:
            # A consumer waiting for more must never be stuck behind its own pause.
            self.read_paused = False
            self.transport.resume_reading()
        fut = asyncio.get_running_loop().create_future()
        self._waiter = fut
        await fut

    def _at_eof(self) -> None:
        if self.error is not None:
            raise self.error
        raise asyncio.IncompleteReadError(bytes(self.buf), None)

    async def read_until(self, sep: bytes, limit: int) -> bytes:
        """Bytes up to and including ``sep``; ``LimitOverrunError`` past ``limit``."""
        buf = self.buf
        start = 0
        while True:
            i = buf.find(sep, start)
            if i >= 0:
                end = i + len(sep)
                if i > limit:
                    raise asyncio.LimitOverrunError("separator found beyond the limit", end)
                out = bytes(buf[:end])
                del buf[:end]
                self.consumed()
                return out
            if len(buf) > limit:
                raise asyncio.LimitOverrunError("separator not found within the limit", len(buf))
            if self.eof:
                self._at_eof()
            start = max(0, len(buf) - len(sep) + 1)
            await self._wait()

    async def read_exactly(self, n: int) -> bytes:
        buf = self.buf
        while len(buf) < n:
            if self.eof:
                self._at_eof()
            await self._wait()
        out = bytes(buf[:n])
        del buf[:n]
        self.consumed()
        return out

    async def read_some(self, n: int = READ_CHUNK) -> bytes:
        """Up to ``n`` bytes as soon as there are any; ``b""`` at a clean end."""
        buf = self.buf
        while not buf:
            if self.eof:
                if self.error is not None:
                    raise self.error
                return b""
            await self._wait()
        if len(buf) <= n:
            out = bytes(buf)
            buf.clear()
        else:
            out = bytes(buf[:n])
            del buf[:n]
        self.consumed()
        return out

    async def drain(self) -> None:
        """Waits while the peer cannot take more; raises once the connection is gone."""
        if self.closed or self.transport.is_closing():
            raise ConnectionResetError("peer closed the connection")
        if not self.write_paused:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiter = fut
        await fut
        if self.closed:
            raise ConnectionResetError("peer closed the connection")
