"""Supervision of the proxy process: start or adopt it, restart it if it dies.

The proxy is its own process (``kiln.traffic``) so that the agent can stop,
crash or restart without dropping a request: it is spawned in its own session,
its pid is kept in ``KILN_HOME/proxy.pid``, and a new agent adopts a live one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import KilnError
from kiln.paths import open_private, write_private
from kiln.process import pid_alive

if TYPE_CHECKING:
    from kiln.traffic.client import ProxyClient

__all__ = ["ProxyProcess"]

log = logging.getLogger("kiln.agent")

PROXY_MARK = "kiln.traffic.proxy"


class ProxyProcess:
    """The one proxy of a KILN_HOME, as the agent sees it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.control = home / "proxy.sock"
        self.state_file = home / "proxy-state.json"
        self.pid_file = home / "proxy.pid"
        self.log_file = home / "proxy.log"
        self._child: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    def client(self) -> ProxyClient:
        from kiln.traffic.client import ProxyClient

        return ProxyClient(self.control)

    def command(self) -> list[str]:
        from kiln.traffic.client import proxy_command

        return list(proxy_command(self.control, self.state_file))

    def alive(self) -> bool:
        if self._child is not None and self._child.poll() is not None:
            self._child = None
            return False
        return self.pid is not None and pid_alive(self.pid, PROXY_MARK)

    def ensure(self, timeout: float = 10.0) -> str:
        """Adopt the running proxy or start one; returns "adopted", "started" or "running"."""
        if self.alive():
            return "running"
        pid = self._recorded_pid()
        if pid is not None and pid_alive(pid, PROXY_MARK):
            self.pid = pid
            client = self.client()
            try:
                client.wait_ready(timeout)
                return "adopted"
            except KilnError:
                log.warning("proxy pid %s does not answer; restarting it", pid)
                _kill(pid)
            finally:
                client.close()
        self._spawn()
        self._wait_started(timeout)
        return "started"

    def _wait_started(self, timeout: float) -> None:
        """Ready, or a KilnError with the proxy's last words if it exits or stays silent."""
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while True:
                child = self._child
                if child is not None and child.poll() is not None:
                    raise KilnError(
                        f"the proxy exited at start (code {child.returncode}); "
                        f"last line of {self.log_file}: {_last_line(self.log_file)}"
                    )
                try:
                    client.wait_ready(0.1)
                    return
                except KilnError:
                    if time.monotonic() > deadline:
                        raise
        finally:
            client.close()

    def recorded_alive(self) -> bool:
        """Whether the proxy this home recorded still runs, whoever started it (an agent
        that died since, say)."""
        pid = self._recorded_pid()
        return pid is not None and pid_alive(pid, PROXY_MARK)

    def _recorded_pid(self) -> int | None:
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _spawn(self) -> None:
        self.control.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(open_private(self.log_file, os.O_WRONLY | os.O_APPEND), "ab") as out:
            child = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._child = child
        self.pid = child.pid
        write_private(self.pid_file, f"{child.pid}\n".encode())

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the proxy finishes in-flight requests), then SIGKILL."""
        pid = self.pid if self.pid is not None else self._recorded_pid()
        if pid is not None and pid_alive(pid, PROXY_MARK):
            _kill(pid, timeout)
        if self._child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(1.0)
            self._child = None
        self.pid = None
        self.pid_file.unlink(missing_ok=True)


def _kill(pid: int, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty)"
