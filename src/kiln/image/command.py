"""Long build commands of a bake (mmdebstrap, apt): logged, interruptible, never left behind.

A command's own output goes to a log file, line by line, and its last lines
are kept for the error message when it fails; the bake's display only gets
one short status at a time. The command runs in its own session, so the
bake, not the terminal, decides when it ends: on Ctrl-C (``cancelled`` set by
the bake) or any other exception the whole process group is killed, and a
command started in its own pid namespace (``unshare --pid --kill-child``) is
waited for until that namespace is empty, so no dpkg of it still writes into
a tree the bake is about to remove.

``setpriv --pdeathsig KILL`` before ``unshare`` ends the command with the
bake's thread even when the bake itself is killed with SIGKILL.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from kiln.errors import KilnError
from kiln.oci.step import terminal_line

__all__ = [
    "INTERRUPTED",
    "PID_NAMESPACE",
    "TAIL_LINES",
    "Interrupted",
    "isolated",
    "run_logged",
]

TAIL_LINES = 20
INTERRUPTED = "interrupted"
# Whatever runs under this prefix dies with the thread that started it (setpriv) and
# takes every process it started with it (a pid namespace whose init is killed when
# unshare dies); its mounts live in a private mount namespace that vanishes with it.
PID_NAMESPACE = (
    "setpriv",
    "--pdeathsig",
    "KILL",
    "--",
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--pid",
    "--kill-child",
    "--mount-proc",
)
_POLL = 0.1
_NAMESPACE_WAIT = 10.0


def isolated(argv: Sequence[str], *, network: bool = True) -> list[str]:
    """``argv`` in its own pid and mount namespaces (:data:`PID_NAMESPACE`); without
    ``network``, in an empty network namespace too (only a down ``lo``)."""
    return [*PID_NAMESPACE, *(() if network else ("--net",)), "--", *argv]


class Interrupted(KilnError):
    """The bake was interrupted (Ctrl-C) while a command ran; the command is gone."""

    def __init__(self) -> None:
        super().__init__(INTERRUPTED)


def run_logged(
    argv: Sequence[str],
    *,
    log: TextIO | None = None,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    cancelled: threading.Event | None = None,
) -> tuple[int, tuple[str, ...]]:
    """Run ``argv`` to its end; returns the exit code and its last output lines.

    Every line (stdout and stderr merged) goes to ``log`` and ``on_line``.
    Raises :class:`Interrupted` when ``cancelled`` is set while it runs, and
    KilnError when it cannot start; either way, and on any other exception,
    nothing it started is left running.
    """
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    namespaced = "unshare" in argv and "--pid" in argv
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as e:
        raise KilnError(f"cannot run {argv[0]}: {e}") from e
    namespace: str | None = None
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        pending = b""
        while True:
            if namespace is None and namespaced:
                namespace = _child_namespace(proc.pid)
            if cancelled is not None and cancelled.is_set():
                raise Interrupted()
            ready, _, _ = select.select([fd], [], [], _POLL)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                _emit(terminal_line(raw), tail, log, on_line)
        if pending:
            _emit(terminal_line(pending), tail, log, on_line)
        code = proc.wait()
    except BaseException:
        _kill(proc)
        _wait_namespace_empty(namespace)
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    _wait_namespace_empty(namespace)
    return code, tuple(tail)


def _emit(
    line: str,
    tail: collections.deque[str],
    log: TextIO | None,
    on_line: Callable[[str], None] | None,
) -> None:
    tail.append(line)
    if log is not None:
        log.write(line + "\n")
        log.flush()
    if on_line is not None:
        on_line(line)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def _namespace_of(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _child_namespace(pid: int) -> str | None:
    """The pid namespace ``unshare`` made for its child, once it has made it."""
    mine = _namespace_of("/proc/self/ns/pid")
    theirs = _namespace_of(f"/proc/{pid}/ns/pid_for_children")
    return theirs if theirs is not None and theirs != mine else None


def _wait_namespace_empty(namespace: str | None, timeout: float = _NAMESPACE_WAIT) -> None:
    """Wait until no process lives in ``namespace`` (its init was killed: the kernel
    kills the others, which takes a moment)."""
    if namespace is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_namespace_of(f"/proc/{pid}/ns/pid") == namespace for pid in _pids()):
            return
        time.sleep(0.02)


def _pids() -> list[str]:
    try:
        return [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
