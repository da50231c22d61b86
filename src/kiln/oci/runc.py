"""runc, driven through its command line: the one OCI runtime Kiln uses.

Each Kiln home keeps its containers' runtime state in its own runc root under
``/run/kiln`` (a tmpfs: the state goes when the machine restarts, as the
containers do), so two homes never see each other's containers.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.process import system_binary

__all__ = ["RUN_ROOT", "Runc", "home_tag", "runc_binary"]

RUN_ROOT = Path("/run/kiln")


def home_tag(home: Path) -> str:
    """A short stable name for a home, for names that must be unique machine-wide."""
    return hashlib.sha256(str(home.absolute()).encode()).hexdigest()[:8]


def runc_binary() -> str:
    found = system_binary("runc")
    if found is None:
        raise KilnError("runc not found: install it (Debian: apt-get install runc)")
    return found


class Runc:
    def __init__(self, home: Path, binary: str | None = None) -> None:
        self.binary = binary or runc_binary()
        self.root = RUN_ROOT / home_tag(home) / "runc"

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def _run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return subprocess.run(
            self.argv(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def state(self, container_id: str) -> dict[str, Any] | None:
        """runc's view of one container, or None when runc does not know it."""
        result = self._run("state", container_id)
        if result.returncode != 0:
            return None
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def list(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        result = self._run("list", "--format", "json")
        if result.returncode != 0 or not result.stdout.strip():
            return []
        data = json.loads(result.stdout)
        return list(data or [])

    def start(self, container_id: str) -> None:
        result = self._run("start", container_id)
        if result.returncode != 0:
            raise KilnError(f"runc start {container_id}: {_error_text(result.stderr)}")

    def kill(self, container_id: str, signal: int, *, all_processes: bool = False) -> None:
        args = ["kill", *(("--all",) if all_processes else ()), container_id, str(signal)]
        self._run(*args)

    def delete(self, container_id: str) -> None:
        """Kill whatever is left and remove the container's state and cgroups; idempotent."""
        result = self._run("delete", "--force", container_id)
        if result.returncode != 0 and self.state(container_id) is not None:
            raise KilnError(f"runc delete {container_id}: {_error_text(result.stderr)}")

    def exec_argv(self, container_id: str, process_file: Path) -> builtins.list[str]:
        """``runc exec`` of a process given as an OCI process file: its env and argv stay
        off the host's command lines, where any host user could read them."""
        return self.argv("exec", "--process", str(process_file), container_id)


def _error_text(stderr: bytes) -> str:
    """runc's last message (its log lines are logfmt or JSON; keep the msg)."""
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "no output"
    last = lines[-1]
    try:
        return str(json.loads(last).get("msg", last))
    except ValueError:
        marker = 'msg="'
        if marker in last:
            return last.split(marker, 1)[1].rsplit('"', 1)[0]
        return last
