"""Head parsing: the one-regex fast path must agree with the line-by-line checks."""

from __future__ import annotations

import pytest

from kiln.traffic import _http as h

GOOD_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a?b=c HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nhost:x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1, FE80::1 \r\nX-Foo:\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
]

BAD_REQUESTS = [
    (b"GARBAGE\r\n\r\n", "malformed request line"),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "unsupported HTTP version"),
    (b"GET / HTTP/1.1\r\n\r\n", "missing Host header"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "malformed header line"),
    (
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "both Transfer-Encoding and Content-Length",
    ),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflict"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", "malformed request line"),
]


def _fields(head: h.Head) -> tuple[object, ...]:
    return (
        head.method,
        head.target,
        head.status,
        head.version,
        head.block,
        head.hop,
        head.forwarded,
        head.framing,
        head.length,
        head.close,
        head.connection_tokens,
        head.expect_continue,
        head.has_host,
        head.xff,
        head.lines,
    )


def _slow_request(raw: bytes) -> h.Head:
    return h._parse_request_lines(raw)


@pytest.mark.parametrize("raw", GOOD_REQUESTS)
def test_fast_and_line_by_line_request_parsing_agree(raw: bytes) -> None:
    assert _fields(h.parse_request(raw)) == _fields(_slow_request(raw))


def test_request_fields() -> None:
    head = h.parse_request(GOOD_REQUESTS[6])
    assert head.xff == b"10.0.0.1, FE80::1", "the value keeps its case, spaces trimmed"
    assert head.forwarded and not head.hop
    assert head.lines[2] == (b"x-foo", b"X-Foo:")
    head = h.parse_request(GOOD_REQUESTS[7])
    assert head.close and head.hop and head.connection_tokens == {b"close", b"x-secret"}
    head = h.parse_request(GOOD_REQUESTS[5])
    assert head.expect_continue and head.framing == h.LENGTH and head.length == 3
    assert h.parse_request(GOOD_REQUESTS[4]).framing == h.CHUNKED
    assert h.parse_request(GOOD_REQUESTS[1]).close, "HTTP/1.0 closes unless keep-alive"
    assert not h.parse_request(GOOD_REQUESTS[2]).close
    plain = h.parse_request(GOOD_REQUESTS[0])
    assert not plain.hop and not plain.forwarded and plain.block == b"Host: x\r\n"


@pytest.mark.parametrize(("raw", "message"), BAD_REQUESTS)
def test_malformed_requests_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(h.HTTPParseError, match=message):
        h.parse_request(raw)


GOOD_RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"GET", h.LENGTH),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", h.NO_BODY),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"GET", h.NO_BODY),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", b"GET", h.NO_BODY),
    (b"HTTP/1.1 100 Continue\r\n\r\n", b"POST", h.NO_BODY),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", h.CHUNKED),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", b"GET", h.UNTIL_CLOSE),
    (b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n", b"GET", h.UNTIL_CLOSE),
    (b"HTTP/1.1 200\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n", b"GET", h.NO_BODY),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", b"GET", h.LENGTH),
]


@pytest.mark.parametrize(("raw", "method", "framing"), GOOD_RESPONSES)
def test_fast_and_line_by_line_response_parsing_agree(
    raw: bytes, method: bytes, framing: int
) -> None:
    head = h.parse_response(raw, method)
    assert head.framing == framing
    assert _fields(head) == _fields(h._parse_response_lines(raw, method))


def test_response_fields() -> None:
    head = h.parse_response(GOOD_RESPONSES[-1][0], b"GET")
    assert head.status == 200 and head.target == b"200 OK" and head.close and head.hop
    assert h.parse_response(GOOD_RESPONSES[8][0], b"GET").target == b"200"
    assert h.parse_response(GOOD_RESPONSES[7][0], b"GET").close


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_malformed_responses_are_refused(raw: bytes) -> None:
    with pytest.raises(h.HTTPParseError):
        h.parse_response(raw, b"GET")
