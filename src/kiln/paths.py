"""Where Kiln keeps things: ``KILN_HOME`` for state, a shared download cache.

``KILN_HOME`` holds the state database, every instance's logs, secrets and
images, so it is owner-only: the home itself and every directory Kiln makes
in it are 0700, every file 0600. Modes are set explicitly, never through the
process umask: the agent and ``kiln bake`` also write image content, whose
modes are part of a digest and must not depend on who runs Kiln.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kiln.errors import KilnError

__all__ = [
    "HOME_DIRS",
    "download_cache",
    "ensure_home",
    "kiln_home",
    "open_private",
    "private_dirs",
    "write_private",
]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
HOME_DIRS = ("cache", "deployments", "images", "instances", "logs", "snapshots", "tmp", "volumes")
"""Made 0700 up front, so code that fills them with ``mkdir(parents=True)`` finds them
private. (``snapshots`` makes itself 0700; an older ``rootfs`` is tightened, not made.)"""


def kiln_home() -> Path:
    env = os.environ.get("KILN_HOME")
    home = Path(env) if env else Path.home() / ".kiln"
    return home.absolute()


def download_cache() -> Path:
    """Downloads (Debian packages) never change a digest, so homes share them."""
    env = os.environ.get("KILN_CACHE")
    if env:
        return Path(env).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kiln"


def ensure_home(home: Path | None = None) -> Path:
    """Create ``KILN_HOME`` as 0700, or tighten an existing one (and what it holds at the
    top level, left 0755/0644 by an older Kiln) to owner-only. Every entry point calls it."""
    home = Path(home).absolute() if home is not None else kiln_home()
    try:
        private_dirs(home)
        _tighten(home, os.stat(home))
        for name in HOME_DIRS:
            private_dirs(home / name)
        with os.scandir(home) as entries:
            for entry in entries:
                if not entry.is_symlink():
                    _tighten(Path(entry.path), entry.stat(follow_symlinks=False))
    except OSError as e:
        raise KilnError(f"{home}: cannot make KILN_HOME private: {e.strerror or e}") from e
    return home


def private_dirs(path: Path) -> None:
    """``mkdir -p`` where every directory created is 0700; existing ones are left alone."""
    missing: list[Path] = []
    current = Path(path).absolute()
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:
            continue
        os.chmod(directory, PRIVATE_DIR)  # the umask may have taken owner bits


def open_private(path: Path, flags: int) -> int:
    """``os.open`` that creates ``path`` 0600 and tightens it if it already existed looser."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        _tighten_fd(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` in a 0600 file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _tighten(path: Path, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    wanted = (mode & ~0o077) | PRIVATE_DIR if stat.S_ISDIR(st.st_mode) else mode & ~0o077
    if wanted != mode:
        os.chmod(path, wanted)


def _tighten_fd(fd: int) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        os.fchmod(fd, mode & ~0o077)
