"""Which processes are this home's HAProxy: found by what they are, not by a pid file.

A pid recorded in ``router.json`` may since belong to anything (pids are
reused, and the file outlives a reboot); a substring of a command line may
be another home's path or a ``tail -f`` of a config. A process is this
home's HAProxy only if its executable is ``haproxy`` and its arguments
say ``-f <home>/haproxy/gen-N.cfg`` exactly. Only such processes are ever
signalled, and an orphan that no record names (an agent killed while
starting a generation) is found all the same.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.process import proc_start_time

__all__ = ["HAProxyProcess", "our_processes"]


@dataclass(frozen=True)
class HAProxyProcess:
    pid: int
    ppid: int
    generation: int
    start: int | None


def our_processes(config_dir: Path) -> list[HAProxyProcess]:
    pattern = re.compile(re.escape(str(config_dir.absolute())) + r"/gen-(\d+)\.cfg")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if not Path(exe.removesuffix(" (deleted)")).name.startswith("haproxy"):
            continue
        words = [w.decode(errors="replace") for w in argv]
        try:
            config = words[words.index("-f") + 1]
        except (ValueError, IndexError):
            continue
        match = pattern.fullmatch(config)
        if match is None:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        pid = int(entry.name)
        found.append(HAProxyProcess(pid, int(fields[1]), int(match.group(1)), proc_start_time(pid)))
    return found


def masters(processes: list[HAProxyProcess]) -> list[HAProxyProcess]:
    """The masters: those whose parent is not one of them (a worker's parent is its master)."""
    pids = {p.pid for p in processes}
    return sorted((p for p in processes if p.ppid not in pids), key=lambda p: p.generation)
