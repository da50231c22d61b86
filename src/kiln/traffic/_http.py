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

from kiln.traffic._conn import READ_CHUNK, BufferedConn

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096

_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_REQUEST = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^ \r\n]+) HTTP/1\.([01])\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r\n)*)\r\n"
)
_RESPONSE = re.compile(
    rb"HTTP/1\.([01]) ([0-9]{3}[^\r\n]*)\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r\n)*)\r\n"
)
_BLOCK = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r\n)*")
# Headers the proxy acts on, found in "\n" + the lower-cased block (lines end in
# CRLF); the leading newline gives the regex engine a literal prefix to scan for.
_SPECIAL = re.compile(
    rb"\n(content-length|transfer-encoding|connection|host|expect|x-forwarded-for"
    rb"|x-forwarded-proto|keep-alive|proxy-connection|te|upgrade):[ \t]*([^\r\n]*?)[ \t]*\r"
)
_XFF = re.compile(rb"(?:^|\n)x-forwarded-for:[ \t]*([^\r\n]*?)[ \t]*\r", re.IGNORECASE)

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
    """One parsed request or response head.

    ``block`` is the raw header block (every line with its CRLF). ``hop`` says
    it holds a hop-by-hop header and ``forwarded`` an X-Forwarded-* header:
    without either, the block is forwarded as it is, which is the common case.
    """

    # Class-level defaults: a parse only writes what differs, which keeps the
    # per-request cost of a head down.
    method = b""
    target = b""
    status = 0
    version = 11
    block = b""
    hop = False
    forwarded = False
    framing = NO_BODY
    length = 0
    close = False
    connection_tokens: frozenset[bytes] = frozenset()
    expect_continue = False
    has_host = False
    xff = b""

    @property
    def lines(self) -> list[tuple[bytes, bytes]]:
        """(lower-case name, raw line without CRLF) for every header line."""
        out = []
        for line in self.block.split(b"\r\n")[:-1]:
            out.append((line.partition(b":")[0].lower(), line))
        return out


def _version(raw: bytes) -> int:
    if raw == b"HTTP/1.1":
        return 11
    if raw == b"HTTP/1.0":
        return 10
    raise HTTPParseError(f"unsupported HTTP version {raw[:16]!r}")


def _headers(head: Head, block: bytes) -> tuple[list[bytes], list[bytes]]:
    """Fills ``head`` from the header block; returns the Transfer-Encoding and
    Content-Length values.

    One regular expression validates every line (a token, a colon, no bare CR
    or LF); a second finds only the headers the proxy acts on.
    """
    if not _BLOCK.fullmatch(block):
        for line in block.split(b"\r\n")[:-1]:
            if not _HEADER.fullmatch(line) or b"\r" in line or b"\n" in line:
                raise HTTPParseError(f"malformed header line {line[:40]!r}")
        raise HTTPParseError(f"malformed header block {block[:40]!r}")
    return _fields(head, block)


def _fields(head: Head, block: bytes) -> tuple[list[bytes], list[bytes]]:
    """``_headers`` for a block already known to be well-formed."""
    head.block = block
    te: list[bytes] = []
    cl: list[bytes] = []
    if not block:
        if head.version == 10:
            head.close = True
        return te, cl
    connection: list[bytes] = []
    for lname, value in _SPECIAL.findall(b"\n" + block.lower()):
        if lname == b"content-length":
            cl.append(value)
        elif lname == b"host":
            head.has_host = True
        elif lname == b"transfer-encoding":
            te.append(value)
        elif lname == b"connection":
            connection.append(value)
            head.hop = True
        elif lname == b"x-forwarded-for":
            # The value as sent, not lower-cased; the last one wins, as before.
            head.xff = _XFF.findall(block)[-1]
            head.forwarded = True
        elif lname == b"x-forwarded-proto":
            head.forwarded = True
        else:
            head.hop = True
            if lname == b"expect":
                head.expect_continue = value == b"100-continue"
    if connection:
        tokens = frozenset(t.strip() for v in connection for t in v.split(b",") if t.strip())
        head.connection_tokens = tokens
        if b"close" in tokens or (head.version == 10 and b"keep-alive" not in tokens):
            head.close = True
    elif head.version == 10:
        head.close = True
    return te, cl


def _length(values: list[bytes]) -> int:
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= 18:
            return int(value)
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
    """Parses a request head ending in CRLFCRLF (leading empty lines are ignored).

    One regular expression recognises a well-formed head at once; anything it
    does not match goes through the line-by-line checks, which either accept
    it the same way or say what is wrong.
    """
    m = _REQUEST.fullmatch(raw)
    if m is None:
        return _parse_request_lines(raw)
    head = Head()
    head.method, head.target, minor, block = m.groups()
    if minor == b"0":
        head.version = 10
    return _request_framing(head, *_fields(head, block))


def _parse_request_lines(raw: bytes) -> Head:
    if raw[:2] == b"\r\n" or raw[:1] == b"\n":
        raw = raw.lstrip(b"\r\n")
    eol = raw.find(b"\r\n")
    if eol <= 0:
        raise HTTPParseError("empty request")
    request_line = raw[:eol]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HTTPParseError(f"malformed request line {request_line[:60]!r}")
    if b"\n" in request_line or b"\r" in request_line:
        raise HTTPParseError("bare CR or LF in request line")
    head = Head()
    head.method, head.target = parts[0], parts[1]
    head.version = _version(parts[2])
    return _request_framing(head, *_headers(head, raw[eol + 2 : -2]))


def _request_framing(head: Head, te: list[bytes], cl: list[bytes]) -> Head:
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
    m = _RESPONSE.fullmatch(raw)
    if m is None:
        return _parse_response_lines(raw, method)
    head = Head()
    minor, head.target, block = m.groups()
    if minor == b"0":
        head.version = 10
    head.status = int(head.target[:3])
    return _response_framing(head, method, *_fields(head, block))


def _parse_response_lines(raw: bytes, method: bytes) -> Head:
    eol = raw.find(b"\r\n")
    if eol <= 0:
        raise HTTPParseError("empty response")
    status_line = raw[:eol]
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if not code.isdigit() or len(code) != 3:
        raise HTTPParseError(f"malformed status line {status_line[:60]!r}")
    head = Head()
    head.version = _version(version)
    head.status = int(code)
    head.target = rest
    return _response_framing(head, method, *_headers(head, raw[eol + 2 : -2]))


def _response_framing(head: Head, method: bytes, te: list[bytes], cl: list[bytes]) -> Head:
    status = head.status
    if method == b"HEAD" or status < 200 or status == 204 or status == 304:
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


async def _maybe_drain(dst: BufferedConn) -> None:
    if dst.write_paused or dst.closed or dst.transport.is_closing():
        await dst.drain()


async def copy_length(src: BufferedConn, dst: BufferedConn, length: int) -> int:
    left = length
    while left:
        data = await src.read_some(min(left, READ_CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        dst.write(data)
        left -= len(data)
        await _maybe_drain(dst)
    return length


async def copy_chunked(src: BufferedConn, dst: BufferedConn, *, dechunk: bool = False) -> int:
    """Relays a chunked body up to and including its trailers; returns payload bytes.

    With ``dechunk`` only the payload is written (for HTTP/1.0 clients).
    """
    total = 0
    while True:
        try:
            line = await src.read_until(b"\r\n", MAX_CHUNK_LINE)
        except asyncio.LimitOverrunError as e:
            raise ChunkError("chunk size line too long") from e
        size_field = line[:-2].split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_field):
            raise ChunkError(f"invalid chunk size {size_field[:20]!r}")
        size = int(size_field, 16)
        if size == 0:
            trailer = bytearray()
            while True:
                try:
                    tline = await src.read_until(b"\r\n", MAX_HEAD)
                except asyncio.LimitOverrunError as e:
                    raise ChunkError("trailers too long") from e
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
        if await src.read_exactly(2) != b"\r\n":
            raise ChunkError("chunk not followed by CRLF")
        if not dechunk:
            dst.write(b"\r\n")


async def copy_until_close(src: BufferedConn, dst: BufferedConn) -> int:
    total = 0
    while True:
        data = await src.read_some(READ_CHUNK)
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
