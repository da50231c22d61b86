"""Listening sockets the agent owns and lends to the data plane.

The agent binds every service port itself and passes the socket to the
proxy by inheritance. While the agent holds its copy the port stays open, so
a proxy that dies or is replaced refuses nothing: connections wait in the
kernel's accept queue until the next proxy accepts them. An agent that
restarts takes its copy back from the running proxy with ``pidfd_getfd``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct

from kiln.errors import KilnError
from kiln.traffic.routes import RouteError

__all__ = ["accept_queue", "bind_listener", "borrow_fd", "can_bind", "unlisten"]

BACKLOG = 4096
_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (unified table)
_libc = ctypes.CDLL(None, use_errno=True)


def bind_listener(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise RouteError(f"port {port} is in use by another program") from e
        if e.errno == errno.EACCES:
            raise RouteError(f"port {port}: permission denied") from e
        raise RouteError(f"port {port}: cannot listen: {e.strerror}") from e
    return sock


def can_bind(address: str, port: int) -> None:
    bind_listener(address, port).close()


def unlisten(sock: socket.socket) -> None:
    """Stop listening for every holder of this socket (``shutdown`` acts on the shared
    socket, ``close`` only on one descriptor): a removed service's port refuses at once
    instead of queueing for a proxy that no longer serves it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    sock.close()


def borrow_fd(pid: int, fd: int, port: int) -> socket.socket:
    """A copy of ``pid``'s listening socket ``fd``, checked to be on ``port``."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise KilnError(f"cannot reach process {pid}: {e.strerror}") from e
    try:
        got = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise KilnError(f"cannot take socket {fd} of process {pid}: {os.strerror(err)}")
    finally:
        os.close(pidfd)
    os.set_inheritable(got, False)
    try:
        sock = socket.socket(fileno=got)
    except OSError as e:
        os.close(got)
        raise KilnError(f"fd {fd} of process {pid} is not a socket") from e
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening or sock.getsockname()[1] != port:
        sock.close()
        raise KilnError(f"fd {fd} of process {pid} is not the listener of port {port}")
    return sock


def accept_queue(sock: socket.socket) -> int:
    """Connections waiting to be accepted (``tcpi_unacked`` of a listening socket)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    # struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked …
    return int(struct.unpack_from("I", info, 8 + 4 * 4)[0])
