"""HAProxy's per-request log lines, received by the agent on a Unix stream socket.

Only latency needs them (HAProxy's own counters cover the rest): each line
is ``service TAB server TAB status TAB total-active-ms`` and feeds the
cumulative histogram of that backend. HAProxy writes them into a ring
buffer and forwards the ring over a stream connection to this socket, one
line per request: unlike datagrams (at most ``net.unix.max_dgram_qlen``, 10
by default, waiting), a stream pushes back, the ring absorbs bursts, and
what was logged while the agent restarted is delivered when it is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from pathlib import Path

from kiln.traffic.router import Latency

__all__ = ["AccessLog"]

log = logging.getLogger("kiln.traffic")

MAX_LINE = 4096
MAX_CONNECTIONS = 16
"""One connection per live HAProxy generation; more is not HAProxy."""


class AccessLog:
    def __init__(self, path: Path, gid: int | None) -> None:
        self.path = path
        self._gid = gid
        self._latency: dict[tuple[str, str], Latency] = {}
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self.lines = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self.path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        if self._gid is not None:
            os.chown(self.path, 0, self._gid)
        os.chmod(self.path, 0o660 if self._gid is not None else 0o600)
        server.listen(MAX_CONNECTIONS)
        server.setblocking(False)
        self._server = server
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="kiln-access-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        server, wake = self._server, self._wake
        assert server is not None and wake is not None
        pending: dict[socket.socket, bytes] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(server, selectors.EVENT_READ)
            sel.register(wake[1], selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is wake[1]:
                        for conn in pending:
                            conn.close()
                        return
                    if sock is server:
                        with contextlib.suppress(OSError):
                            conn, _ = server.accept()
                            if len(pending) >= MAX_CONNECTIONS:
                                conn.close()
                                continue
                            conn.setblocking(False)
                            pending[conn] = b""
                            sel.register(conn, selectors.EVENT_READ)
                        continue
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(sock)
                        pending.pop(sock, None)
                        sock.close()
                        continue
                    lines = (pending[sock] + data).split(b"\n")
                    rest = lines.pop()
                    pending[sock] = rest if len(rest) <= MAX_LINE else b""
                    try:
                        self._take(lines)
                    except Exception:  # a malformed line must not end the reader
                        log.exception("access log lines")

    def _take(self, lines: list[bytes]) -> None:
        with self._lock:
            for line in lines:
                parts = line.split(b"\t")
                if len(parts) != 4 or not parts[3].isdigit():
                    continue
                key = (parts[0].decode(errors="replace"), parts[1].decode(errors="replace"))
                hist = self._latency.get(key)
                if hist is None:
                    hist = self._latency[key] = Latency()
                hist.add(int(parts[3]))
                self.lines += 1

    def latency(self) -> dict[tuple[str, str], Latency]:
        with self._lock:
            return {k: Latency(v.counts) for k, v in self._latency.items()}

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None and self._wake is not None:
            self._wake[0].send(b"x")
            thread.join(timeout=2)
        for sock in (self._server, *(self._wake or ())):
            if sock is not None:
                sock.close()
        self._server = None
        self._wake = None
        self.path.unlink(missing_ok=True)
