"""Backends and a raw HTTP client for the listener attack suite.

* ``StrictBackend``: uvicorn with the h11 HTTP implementation (a strict HTTP/1.1
  parser) in a subprocess, on a socket the test binds and passes it. Its app
  records every request it parses (method, target, headers, body, peer port) and
  answers ``GET /__seen`` / ``POST /__reset`` on the same port, asked directly
  (never through the proxy), so a test can assert exactly which requests reached
  it. ``POST /capture`` stores its body (an attacker's sink for a victim's request);
  ``GET /private`` answers a secret only with ``Cookie: session=victim``.
* ``HostileBackend``: a raw socket server in a thread that answers each request
  with the bytes a test scripted for its path (bad framing, control characters,
  no answer at all), and records the request heads it got.
* ``Client``: one raw client connection whose responses are read strictly
  (``read_response`` raises ``Ambiguous`` on any framing a lenient client could read
  another way), so a test sees exactly what a client would.
* ``SlowClients``: a process holding thousands of slowloris connections (each
  process has its own descriptor limit).

Run as a script it is one of those processes: ``python strict_backend.py FD`` serves
the strict backend on the inherited socket FD, ``python strict_backend.py slowloris
PORT COUNT INTERVAL`` holds the slow connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SECRET = "SECRET-victim-" + secrets.token_hex(8)
"""Only the victim's requests are answered this; it must never reach the attacker."""
VICTIM_COOKIE = "session=victim"

# -- the strict backend's app (runs in the subprocess) ---------------------

_SEEN: list[dict[str, Any]] = []


async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if scope["type"] != "http":
        return
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["raw_path"].decode("latin-1")
    if scope["query_string"]:
        path += "?" + scope["query_string"].decode("latin-1")
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
    status, answer = 200, b""
    if path == "/__seen":
        answer = json.dumps(_SEEN).encode()
    elif path == "/__reset":
        _SEEN.clear()
    else:
        _SEEN.append(
            {
                "method": scope["method"],
                "path": path,
                "headers": headers,
                "body": bytes(body[:65536]).decode("latin-1"),
                "peer": (scope.get("client") or ("", 0))[1],
            }
        )
        cookies = [v for k, v in headers if k == "cookie"]
        if path == "/capture":
            answer = b"captured %d" % len(body)
        elif path == "/private":
            if any(VICTIM_COOKIE in c for c in cookies):
                answer = os.environ.get("STRICT_SECRET", "").encode()
            else:
                status, answer = 403, b"forbidden"
        elif path == "/echo":
            answer = json.dumps({"headers": headers, "body": body.decode("latin-1")}).encode()
        else:
            answer = f"ok {scope['method']} {path}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))],
        }
    )
    await send({"type": "http.response.body", "body": answer})


def _serve(fd: int) -> None:
    import uvicorn

    # A socket object that knows it is TCP (family, type and protocol read from the
    # descriptor): asyncio sets TCP_NODELAY only on such sockets, and without it the
    # body (written after the head) waits for HAProxy's delayed ACK, 40 ms a response.
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(
        app,
        http="h11",
        loop="asyncio",
        lifespan="off",
        log_level="error",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=30,
    )
    uvicorn.Server(config).run(sockets=[sock])


# -- the test side ---------------------------------------------------------


@dataclass
class StrictBackend:
    """uvicorn+h11 in a subprocess on a loopback port the test chose; stopped after."""

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StrictBackend:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        env = dict(os.environ, STRICT_SECRET=SECRET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(sock.fileno())],
                pass_fds=(sock.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            sock.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                self.seen()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the strict backend did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ask(self, method: str, path: str) -> bytes:
        with Client(self.port) as c:
            response = c.request(
                f"{method} {path} HTTP/1.1\r\nHost: side\r\nContent-Length: 0\r\n\r\n".encode()
            )
        assert response.status == 200, response
        return response.body

    def seen(self) -> list[dict[str, Any]]:
        """Every request the backend parsed since the last reset, in order."""
        return list(json.loads(self._ask("GET", "/__seen")))

    def reset(self) -> None:
        self._ask("POST", "/__reset")


# -- a hostile backend -----------------------------------------------------

Script = Callable[[socket.socket, bytes], bool]
"""Answers one request head on a connection; whether to keep the connection."""


def canned(raw: bytes, keep: bool = True) -> Script:
    def answer(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(raw)
        return keep

    return answer


def silent(conn: socket.socket, head: bytes) -> bool:
    """Never answer: hold the connection until the peer closes it."""
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass
    return False


@dataclass
class HostileBackend:
    """A raw socket server that answers each path with scripted bytes.

    A path with no script gets ``200 fine <path>`` with a correct Content-Length,
    on a keep-alive connection."""

    scripts: dict[str, Script] = field(default_factory=dict)
    heads: list[bytes] = field(default_factory=list)
    port: int = 0
    _sock: socket.socket | None = None
    _conns: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> HostileBackend:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = self._sock.getsockname()[1]
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        with self._lock:
            return [h.split(b" ", 2)[1].decode("latin-1") for h in self.heads]

    def reset(self) -> None:
        with self._lock:
            self.heads.clear()

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    buf += piece
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                need = int(length.group(1)) if length else 0
                while len(buf) < need:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    buf += piece
                buf = buf[need:]
                with self._lock:
                    self.heads.append(head)
                path = head.split(b" ", 2)[1].decode("latin-1")
                script = self.scripts.get(path)
                if script is None:
                    body = f"fine {path}".encode()
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                elif not script(conn, head):
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


# -- a strict client -------------------------------------------------------


class Ambiguous(AssertionError):
    """A response whose framing a client could read two ways."""


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[str, bytes]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k == name.lower()]

    def text(self) -> str:
        return self.body.decode("latin-1")


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.raw = bytearray()

    def _fill(self) -> bool:
        piece = self.sock.recv(65536)
        if not piece:
            return False
        self.buf += piece
        return True

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(bytes(self.raw + self.buf))
        i = self.buf.index(b"\r\n")
        out = bytes(self.buf[:i])
        self.raw += self.buf[: i + 2]
        del self.buf[: i + 2]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(bytes(self.raw + self.buf))
        out = bytes(self.buf[:n])
        self.raw += out
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.raw += out
        self.buf.clear()
        return out


_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Client:
    """One client connection that sends raw bytes and reads responses strictly."""

    def __init__(self, port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = _Reader(self.sock)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, head_only: bool = False) -> Response:
        return read_response(self._reader, head_only)

    def request(self, data: bytes) -> Response:
        self.send(data)
        return self.response()

    def rest(self, wait: float = 0.3) -> bytes:
        """Whatever else arrives within ``wait`` seconds (until EOF): should be nothing."""
        self.sock.settimeout(wait)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while self._reader._fill():
                pass
        out = bytes(self._reader.buf)
        self._reader.buf.clear()
        return out

    def closed(self, wait: float = 1.0) -> bool:
        """Whether the peer closed the connection (EOF or reset) within ``wait`` seconds,
        with nothing sent before."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b"" and not self._reader.buf
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def read_response(reader: _Reader, head_only: bool = False) -> Response:
    """One response, read strictly (bytes beyond it stay for the next call).

    Raises ``Ambiguous`` for a response a lenient client could frame differently
    (Content-Length with Transfer-Encoding, several or bad Content-Length values,
    a line ending in a bare CR or LF, a control character in a header)."""
    reader.raw.clear()
    status_line = reader.line()
    m = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) ([^\x00-\x08\x0a-\x1f\x7f]*)", status_line)
    if not m:
        raise Ambiguous(f"bad status line {status_line!r}")
    status = int(m.group(1))
    headers: list[tuple[str, bytes]] = []
    while True:
        line = reader.line()
        if not line:
            break
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise Ambiguous(f"bad header line {line!r}")
        value = value.strip(b" \t")
        if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise Ambiguous(f"control character in header {line!r}")
        headers.append((name.decode().lower(), value))
    lengths = [v for k, v in headers if k == "content-length"]
    codings = [v for k, v in headers if k == "transfer-encoding"]
    if lengths and codings:
        raise Ambiguous(f"Content-Length {lengths} with Transfer-Encoding {codings}")
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        raise Ambiguous(f"Content-Length {lengths}")
    if codings and [c.strip().lower() for c in b",".join(codings).split(b",")] != [b"chunked"]:
        raise Ambiguous(f"Transfer-Encoding {codings}")
    body = b""
    if head_only or status in (204, 304) or 100 <= status < 200:
        pass
    elif codings:
        while True:
            size_line = reader.line()
            if not re.fullmatch(rb"[0-9a-fA-F]{1,8}", size_line.split(b";")[0]):
                raise Ambiguous(f"bad chunk size {size_line!r}")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while reader.line():
                    pass
                break
            body += reader.exact(size)
            if reader.exact(2) != b"\r\n":
                raise Ambiguous("chunk not followed by CRLF")
    elif lengths:
        body = reader.exact(int(lengths[0]))
    else:
        body = reader.rest()
    return Response(status, m.group(2), headers, body, bytes(reader.raw))


class SlowClients:
    """A process holding ``count`` slowloris connections to ``port`` (see ``_slowloris``)."""

    def __init__(
        self, port: int, count: int, interval: float = 0.5, source: str = "127.0.0.1"
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "slowloris", str(port), str(count), str(interval), source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def opened(self, timeout: float = 60) -> tuple[int, int]:
        """(connections made, connections that failed), once the process has tried all."""
        words = self._line(timeout).split()
        assert words[0] == "open", words
        return int(words[1]), int(words[2])

    def closed(self, timeout: float = 60) -> tuple[int, int, float, float]:
        """(closed by the peer, of which answered 408, first and last close in seconds
        after ``opened``), once the proxy closed all of them."""
        words = self._line(timeout).split()
        assert words[0] == "closed", words
        return int(words[1]), int(words[2]), float(words[3]), float(words[4])

    def _line(self, timeout: float) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no word from the slow clients in {timeout}s")
        return self.proc.stdout.readline()

    def stop(self) -> None:
        """Close every connection it still holds and end the process."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- slow clients (run in their own process: each holds thousands of sockets) --


def _slowloris(port: int, count: int, interval: float, source: str) -> None:
    """Open ``count`` connections that each send a partial request head, then one more
    header byte every ``interval`` seconds until stdin closes.

    Prints ``open N FAILED`` once every connection is made (or failed), and
    ``closed K N408 FIRST LAST`` (seconds since ``open``) once the proxy has closed all
    of them, or on stdin closing, whichever is first."""
    import resource
    import select

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks: dict[int, socket.socket] = {}
    pending: dict[int, socket.socket] = {}
    failed = 0
    ep = select.epoll()
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.bind((source, 0))
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, 115):  # EINPROGRESS
            failed += 1
            s.close()
            continue
        pending[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLOUT)
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        for fd, _ in ep.poll(1.0):
            s = pending.pop(fd)
            ep.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                failed += 1
                s.close()
                continue
            try:
                s.send(b"GET /slow HTTP/1.1\r\nHost: slowloris\r\nX-Pad: ")
            except OSError:  # refused after the handshake (a per-address cap)
                failed += 1
                s.close()
                continue
            socks[fd] = s
    for s in pending.values():
        failed += 1
        s.close()
    for fd in socks:
        ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
    start = time.monotonic()
    print(f"open {len(socks)} {failed}", flush=True)
    ep.register(sys.stdin.fileno(), select.EPOLLIN | select.EPOLLHUP)
    closed = got408 = 0
    first = last = 0.0
    next_trickle = time.monotonic() + interval
    total = len(socks)
    while True:
        now = time.monotonic()
        if now >= next_trickle:
            for s in socks.values():
                with contextlib.suppress(OSError):
                    s.send(b"a")
            next_trickle = now + interval
        stop = False
        for fd, _ in ep.poll(max(next_trickle - time.monotonic(), 0)):
            if fd == sys.stdin.fileno():
                stop = True
                continue
            s = socks.pop(fd, None)
            if s is None:
                continue
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            got408 += data.startswith(b"HTTP/1.1 408")
            ep.unregister(fd)
            s.close()
            closed += 1
            last = time.monotonic() - start
            first = first or last
        if stop or (total and closed == total):
            print(f"closed {closed} {got408} {first:.3f} {last:.3f}", flush=True)
            break
    if not stop:
        sys.stdin.read()
    for s in socks.values():
        s.close()


if __name__ == "__main__":
    if sys.argv[1] == "slowloris":
        _slowloris(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    else:
        _serve(int(sys.argv[1]))
