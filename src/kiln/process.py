"""Facts about host processes, read from /proc: used by every layer that adopts or
judges a pid it recorded earlier (locks, the proxy, instances, dead bakes)."""

from __future__ import annotations

import shutil
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after the command name, or None when the pid is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields


def pid_alive(pid: int, mark: str | None = None) -> bool:
    """True iff ``pid`` runs (not a zombie) and, with ``mark``, its command line contains it."""
    if _stat_fields(pid) is None:
        return False
    if mark is None:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return mark in cmdline


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): a pid plus this names
    one process for good, so a recycled pid is never mistaken for it."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def system_binary(name: str) -> str | None:
    """A Debian binary on PATH, or in /usr/sbin or /usr/bin when PATH lacks them (a
    non-login root shell, a service manager)."""
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
