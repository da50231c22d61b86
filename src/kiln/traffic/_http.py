"""HTTP/1.1 message heads and body framing, as the proxy needs them.

Only the head is parsed; bodies are streamed by the caller according to the
framing found here. Every rule that decides where one message ends and the
next begins lives in this module, because getting it wrong is how request
smuggling happens: a request with both Transfer-Encoding and Content-Length,
a non-chunked Transfer-Encoding, or conflicting lengths is refused.
"""

from __future__ import annotations

import asyncio
import re

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096

_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

# Meaningful only for one hop; never forwarded. Transfer-Encoding is kept
# because bodies are relayed in their original framing.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"expect"}
)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

NO_BODY = 0
LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3


class HTTPParseError(Exception):
    """The peer sent something that is not HTTP/1.x; the message says what."""


class Head:
    """One parsed request or response head; ``lines`` keeps the raw header lines."""

    __slots__ = (
        "close",
        "connection_tokens",
        "expect_continue",
        "framing",
        "has_host",
        "length",
        "lines",
        "method",
        "status",
        "target",
        "version",
        "xff",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.status = 0
        self.version = 11
        self.lines: list[tuple[bytes, bytes]] = []
        self.framing = NO_BODY
        self.length = 0
        self.close = False
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.expect_continue = False
        self.has_host = False
        self.xff = b""


def _version(raw: bytes) -> int:
    if raw == b"HTTP/1.1":
        return 11
    if raw == b"HTTP/1.0":
        return 10
    raise HTTPParseError(f"unsupported HTTP version {raw[:16]!r}")


def _headers(head: Head, lines: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Fills ``head.lines``; returns the Transfer-Encoding and Content-Length values."""
    te: list[bytes] = []
    cl: list[bytes] = []
    connection: list[bytes] = []
    out = head.lines
    match = _HEADER.fullmatch
    for line in lines:
        m = match(line)
        if m is None or b"\r" in line or b"\n" in line:
            raise HTTPParseError(f"malformed header line {line[:40]!r}")
        lname = m.group(1).lower()
        out.append((lname, line))
        if lname == b"content-length":
            cl.append(m.group(2))
        elif lname == b"transfer-encoding":
            te.append(m.group(2))
        elif lname == b"connection":
            connection.append(m.group(2))
        elif lname == b"host":
            head.has_host = True
        elif lname == b"expect":
            head.expect_continue = m.group(2).lower() == b"100-continue"
        elif lname == b"x-forwarded-for":
            head.xff = m.group(2)
    if connection:
        tokens = frozenset(
            t.strip().lower() for v in connection for t in v.split(b",") if t.strip()
        )
        head.connection_tokens = tokens
        if b"close" in tokens or (head.version == 10 and b"keep-alive" not in tokens):
            head.close = True
    elif head.version == 10:
        head.close = True
    return te, cl


def _length(values: list[bytes]) -> int:
    parts = {p.strip() for v in values for p in v.split(b",")}
    if len(parts) != 1:
        raise HTTPParseError("conflicting Content-Length values")
    value = parts.pop()
    if not value.isdigit() or len(value) > 18:
        raise HTTPParseError(f"invalid Content-Length {value[:20]!r}")
    return int(value)


def _chunked(values: list[bytes]) -> bool:
    codings = [c.strip().lower() for v in values for c in v.split(b",") if c.strip()]
    return bool(codings) and codings[-1] == b"chunked"


def parse_request(raw: bytes) -> Head:
    """Parses a request head ending in CRLFCRLF (leading empty lines are ignored)."""
    lines = raw.lstrip(b"\r\n").split(b"\r\n")
    del lines[-2:]
    if not lines:
        raise HTTPParseError("empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HTTPParseError(f"malformed request line {lines[0][:60]!r}")
    if b"\n" in lines[0] or b"\r" in lines[0]:
        raise HTTPParseError("bare CR or LF in request line")
    head = Head()
    head.method, head.target = parts[0], parts[1]
    head.version = _version(parts[2])
    te, cl = _headers(head, lines[1:])
    if te:
        if cl:
            raise HTTPParseError("both Transfer-Encoding and Content-Length")
        if not _chunked(te) or head.version == 10:
            raise HTTPParseError("unsupported Transfer-Encoding")
        head.framing = CHUNKED
    elif cl:
        head.length = _length(cl)
        head.framing = LENGTH if head.length else NO_BODY
    if head.version == 11 and not head.has_host:
        raise HTTPParseError("missing Host header")
    return head


def parse_response(raw: bytes, method: bytes) -> Head:
    """Parses a response head; the request method decides whether a body follows."""
    lines = raw.split(b"\r\n")
    del lines[-2:]
    if not lines:
        raise HTTPParseError("empty response")
    status_line = lines[0]
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if not code.isdigit() or len(code) != 3:
        raise HTTPParseError(f"malformed status line {status_line[:60]!r}")
    head = Head()
    head.version = _version(version)
    head.status = int(code)
    head.target = rest
    te, cl = _headers(head, lines[1:])
    status = head.status
    if method == b"HEAD" or status < 200 or status in (204, 304):
        head.framing = NO_BODY
    elif te:
        head.framing = CHUNKED if _chunked(te) else UNTIL_CLOSE
        if head.framing == UNTIL_CLOSE:
            head.close = True
    elif cl:
        head.length = _length(cl)
        head.framing = LENGTH if head.length else NO_BODY
    else:
        head.framing = UNTIL_CLOSE
        head.close = True
    return head


class ChunkError(Exception):
    """A chunked body that does not follow the chunk grammar."""


async def _maybe_drain(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if transport.get_write_buffer_size() > 256 * 1024:
        await writer.drain()
    elif transport.is_closing():
        raise ConnectionResetError("peer closed the connection")


async def copy_length(src: asyncio.StreamReader, dst: asyncio.StreamWriter, length: int) -> int:
    left = length
    while left:
        data = await src.read(min(left, 256 * 1024))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        dst.write(data)
        left -= len(data)
        await _maybe_drain(dst)
    return length


async def copy_chunked(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, dechunk: bool = False
) -> int:
    """Relays a chunked body up to and including its trailers; returns payload bytes.

    With ``dechunk`` only the payload is written (for HTTP/1.0 clients).
    """
    total = 0
    while True:
        line = await src.readuntil(b"\r\n")
        if len(line) > MAX_CHUNK_LINE:
            raise ChunkError("chunk size line too long")
        size_field = line[:-2].split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_field):
            raise ChunkError(f"invalid chunk size {size_field[:20]!r}")
        size = int(size_field, 16)
        if size == 0:
            trailer = bytearray()
            while True:
                tline = await src.readuntil(b"\r\n")
                trailer += tline
                if tline == b"\r\n":
                    break
                if len(trailer) > MAX_HEAD:
                    raise ChunkError("trailers too long")
            if not dechunk:
                dst.write(line + trailer)
            return total
        if not dechunk:
            dst.write(line)
        await copy_length(src, dst, size)
        total += size
        if await src.readexactly(2) != b"\r\n":
            raise ChunkError("chunk not followed by CRLF")
        if not dechunk:
            dst.write(b"\r\n")


async def copy_until_close(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> int:
    total = 0
    while True:
        data = await src.read(256 * 1024)
        if not data:
            return total
        dst.write(data)
        total += len(data)
        await _maybe_drain(dst)


REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    409: b"Conflict",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}


def simple_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    close: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A whole response the proxy itself answers with (errors, control API)."""
    reason = REASONS.get(status, b"OK" if status < 300 else b"Error")
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Content-Type: " + content_type + b"\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            extra,
            b"\r\n",
            body,
        )
    )
