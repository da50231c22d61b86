"""Memory and CPU limits for local instances through cgroups, v2 or v1.

Each instance gets a ``kiln/<instance_id>`` group. On cgroup v1 it is nested
under the shim's own group of each controller, so an instance never escapes
limits that already enclose Kiln; on v2 it sits under the hierarchy root
(the "no internal processes" rule forbids controllers below a group that
holds processes). When no group can be created (no root, read-only mount,
missing controller) :func:`create_instance_cgroup` returns None and the shim
falls back to ``RLIMIT_AS``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CGROUP_ROOT",
    "CPU_PERIOD_US",
    "InstanceCgroup",
    "create_instance_cgroup",
    "detect_version",
    "v1_settings",
    "v2_settings",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


def v1_settings(memory: int | None, cpu: float | None) -> dict[str, dict[str, str]]:
    """Controller → file → value, in the order they must be written."""
    settings: dict[str, dict[str, str]] = {}
    if memory is not None:
        settings["memory"] = {"memory.limit_in_bytes": str(memory)}
    if cpu is not None:
        settings["cpu"] = {
            "cpu.cfs_period_us": str(CPU_PERIOD_US),
            "cpu.cfs_quota_us": str(max(1000, int(cpu * CPU_PERIOD_US))),
        }
    return settings


def v2_settings(memory: int | None, cpu: float | None) -> dict[str, str]:
    settings: dict[str, str] = {}
    if memory is not None:
        settings["memory.max"] = str(memory)
        settings["memory.swap.max"] = "0"
    if cpu is not None:
        settings["cpu.max"] = f"{max(1000, int(cpu * CPU_PERIOD_US))} {CPU_PERIOD_US}"
    return settings


def detect_version(root: Path = CGROUP_ROOT) -> int | None:
    """2 when the unified hierarchy at ``root`` has the memory controller, 1 for v1, else None."""
    controllers = root / "cgroup.controllers"
    if controllers.exists():
        return 2 if "memory" in controllers.read_text().split() else None
    if (root / "memory" / "cgroup.procs").exists():
        return 1
    return None


def _own_v1_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller → this process's group path, parsed from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1]:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


@dataclass(frozen=True)
class InstanceCgroup:
    """The groups one instance's processes live in; recorded so destroy can remove them."""

    version: int
    dirs: tuple[Path, ...]

    def join(self, pid: int) -> None:
        for directory in self.dirs:
            (directory / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for directory in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
        return sorted(found)

    def oom_killed(self) -> bool:
        """Whether the kernel killed something here for exceeding the memory limit."""
        for directory in self.dirs:
            for name in ("memory.events", "memory.oom_control"):
                with contextlib.suppress(OSError):
                    for line in (directory / name).read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill" and int(value) > 0:
                            return True
        return False

    def remove(self, timeout: float = 2.0) -> None:
        """Kill whatever is left inside and remove the groups."""
        deadline = time.monotonic() + timeout
        for directory in self.dirs:
            while directory.exists():
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    for pid in self.pids():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.02)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "dirs": [str(d) for d in self.dirs]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InstanceCgroup:
        return cls(version=int(d["version"]), dirs=tuple(Path(p) for p in d["dirs"]))


def create_instance_cgroup(
    instance_id: str,
    memory: int | None,
    cpu: float | None,
    root: Path = CGROUP_ROOT,
) -> InstanceCgroup | None:
    """Create and configure ``kiln/<instance_id>``; None when this machine does not allow it."""
    if memory is None and cpu is None:
        return None
    version = detect_version(root)
    created: list[Path] = []
    try:
        if version == 2:
            kiln_dir = root / "kiln"
            kiln_dir.mkdir(exist_ok=True)
            wanted = " ".join(
                f"+{c}" for c, on in (("memory", memory), ("cpu", cpu)) if on is not None
            )
            (root / "cgroup.subtree_control").write_text(wanted)
            (kiln_dir / "cgroup.subtree_control").write_text(wanted)
            directory = kiln_dir / instance_id
            directory.mkdir()
            created.append(directory)
            for name, value in v2_settings(memory, cpu).items():
                if (directory / name).exists():
                    (directory / name).write_text(value)
            return InstanceCgroup(2, (directory,))
        if version == 1:
            own = _own_v1_paths(Path("/proc/self/cgroup").read_text())
            for controller, files in v1_settings(memory, cpu).items():
                mount = root / controller
                if not mount.is_dir():
                    raise OSError(errno.ENOENT, f"no cgroup v1 controller {controller}")
                directory = mount / own.get(controller, "/").lstrip("/") / "kiln" / instance_id
                directory.mkdir(parents=True)
                created.append(directory)
                for name, value in files.items():
                    (directory / name).write_text(value)
                if controller == "memory" and (directory / "memory.memsw.limit_in_bytes").exists():
                    with contextlib.suppress(OSError):
                        (directory / "memory.memsw.limit_in_bytes").write_text(str(memory))
            return InstanceCgroup(1, tuple(created))
    except OSError:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        return None
    return None
