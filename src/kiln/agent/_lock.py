"""One agent per KILN_HOME: an flock on ``agent.pid`` that the kernel drops when we die."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kiln.errors import KilnError
from kiln.paths import ensure_home, open_private

__all__ = ["AgentAlreadyRunning", "AgentLock"]


class AgentAlreadyRunning(KilnError):
    """Another agent holds this KILN_HOME."""


class AgentLock:
    """Held for the agent's whole life; even SIGKILL releases it, so no stale lock survives."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / "agent.pid"
        self._fd: int | None = None

    def acquire(self) -> None:
        ensure_home(self.home)
        fd = open_private(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AgentAlreadyRunning(
                f"an agent already runs for {self.home} (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Empty the pid file rather than unlink it: unlinking races with a new agent's open."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def read_agent_pid(home: Path) -> int | None:
    try:
        text = (home / "agent.pid").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
