"""HAProxy's per-request log lines, received by the agent on a Unix datagram socket.

Only latency needs them (HAProxy's own counters cover the rest): each line
is ``service TAB server TAB status TAB total-active-ms``, and feeds the
cumulative histogram of that backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

from kiln.traffic.router import Latency

__all__ = ["AccessLog"]

log = logging.getLogger("kiln.traffic")

RCVBUF = 4 << 20


class AccessLog:
    def __init__(self, path: Path, gid: int | None) -> None:
        self.path = path
        self._gid = gid
        self._latency: dict[tuple[str, str], Latency] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.lines = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind(str(self.path))
        if self._gid is not None:
            os.chown(self.path, 0, self._gid)
        os.chmod(self.path, 0o660 if self._gid is not None else 0o600)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="kiln-access-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            try:
                self._take(data)
            except Exception:  # a malformed line must not end the reader
                log.exception("access log line %r", data[:200])

    def _take(self, data: bytes) -> None:
        parts = data.rstrip(b"\n").split(b"\t")
        if len(parts) != 4 or not parts[3].isdigit():
            return
        key = (parts[0].decode(errors="replace"), parts[1].decode(errors="replace"))
        with self._lock:
            hist = self._latency.get(key)
            if hist is None:
                hist = self._latency[key] = Latency()
            hist.add(int(parts[3]))
            self.lines += 1

    def latency(self) -> dict[tuple[str, str], Latency]:
        with self._lock:
            return {k: Latency(v.counts) for k, v in self._latency.items()}

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        self.path.unlink(missing_ok=True)
