"""A bake's root filesystem: an overlay of the image's layer snapshots, changes in staging.

The layers so far are the read-only lower dirs (:mod:`kiln.image.snapshots`,
one per layer, shared with instances and other bakes); the upper and work
dirs lie in the bake's staging dir, and the merged view is what later layers
are applied to, what ``run`` steps see and what ``snapshot``/``layer_from_diff``
read. Overlayfs never writes to a lower dir, so concurrent bakes share them.

Two overlay effects would make a step's layer differ from the one the same
step writes over a plain tree, and both are undone here:

* Copying up a directory (any change below it copies up its parents) gives it
  a new ctime, and a merged directory reports ``nlink`` 1. So every directory
  is copied up once before the first snapshot (:meth:`OverlayRootfs.copy_up_directories`);
  from then on the upper directories behave exactly like plain ones.
* Opening a lower file for writing copies it up (new ctime) even when nothing
  is written, as ``apt`` does with its lock files. :meth:`OverlayRootfs.settle`
  treats a file whose only change is the ctime of its copy-up, and whose bytes
  equal the lower file's, as unchanged — as the plain tree sees it.

Mount options: ``index=on`` keeps hard links of a lower layer linked across
copy-up (a write through one name shows through the other, as on a plain
tree) and ``redirect_dir=on`` lets a step rename a lower directory instead of
failing with EXDEV.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from kiln.errors import KilnError
from kiln.image.layer import PathState, Snapshot

OVERLAY_OPTIONS = ("index=on", "redirect_dir=on")
# The kernel copies a mount's option string into one page.
MAX_OPTIONS_BYTES = 4000
_CHUNK = 1 << 20
# Characters that the overlay mount option string cannot carry in a path unescaped.
_UNSAFE_IN_OPTIONS = frozenset(",:\\\n")


# -- mounts -----------------------------------------------------------------


def overlay_options(lowers: Sequence[Path], upper: Path, work: Path) -> str:
    """``lowers`` bottom first, as an image lists its layers; overlayfs wants the top first."""
    lowerdir = ":".join(str(lower) for lower in reversed(lowers))
    return ",".join(
        (f"lowerdir={lowerdir}", f"upperdir={upper}", f"workdir={work}", *OVERLAY_OPTIONS)
    )


def overlay_mount_argv(lowers: Sequence[Path], upper: Path, work: Path, merged: Path) -> list[str]:
    options = overlay_options(lowers, upper, work)
    return ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)]


def options_fit(lowers: Sequence[Path], upper: Path, work: Path) -> bool:
    """Whether the mount can take these paths: no characters the option string cannot
    carry, and short enough for the kernel's one page of options."""
    options = overlay_options(lowers, upper, work)
    return options_safe(*lowers, upper, work) and len(options.encode()) <= MAX_OPTIONS_BYTES


def umount_argv(path: Path, *, lazy: bool = False) -> list[str]:
    return ["umount", *(["--lazy"] if lazy else []), str(path)]


def execute(argv: Sequence[str], what: str) -> None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as e:
        raise KilnError(f"{what}: cannot run {argv[0]}: {e}") from e
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise KilnError(f"{what}: {argv[0]} exit {done.returncode}: {' '.join(message)}")


def _unescape_mount_field(field: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root``, deepest first."""
    root = Path(root).absolute()
    found: list[Path] = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 2:
            continue
        point = Path(_unescape_mount_field(fields[1]))
        if point == root or point.is_relative_to(root):
            found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount(path: Path) -> bool:
    """Unmount ``path``; when it is busy, detach it lazily. True when nothing is left there."""
    with contextlib.suppress(KilnError):
        execute(umount_argv(path), f"unmount {path}")
        return True
    with contextlib.suppress(KilnError):
        execute(umount_argv(path, lazy=True), f"unmount {path}")
        return True
    return path not in mounts_under(path)


def unmount_all_under(root: Path) -> bool:
    """Unmount everything below ``root`` (a dead bake's staging dir). True when none is left."""
    return all(unmount(point) for point in mounts_under(root))


_probe_lock = threading.Lock()
_probed: dict[Path, bool] = {}


def options_safe(*paths: Path) -> bool:
    return all(not (_UNSAFE_IN_OPTIONS & set(str(p))) for p in paths)


def overlay_usable(scratch: Path) -> bool:
    """Whether this process can mount an overlay with :data:`OVERLAY_OPTIONS` in ``scratch``.

    Tried once per process and directory: it needs root and a kernel (and an
    upper filesystem) that offer the options. When it cannot, bakes unpack the
    layers into staging instead.
    """
    scratch = Path(scratch).absolute()
    with _probe_lock:
        known = _probed.get(scratch)
        if known is not None:
            return known
        usable = os.geteuid() == 0 and options_safe(scratch) and _try_overlay(scratch)
        _probed[scratch] = usable
        return usable


def _try_overlay(scratch: Path) -> bool:
    scratch.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix=f"overlay-probe-{os.getpid()}-", dir=scratch))
    try:
        dirs = [probe / name for name in ("lower", "upper", "work", "merged")]
        for path in dirs:
            path.mkdir()
        lower, upper, work, merged = dirs
        try:
            execute(overlay_mount_argv([lower], upper, work, merged), "overlay probe")
        except KilnError:
            return False
        return unmount(merged)
    finally:
        if not mounts_under(probe):
            shutil.rmtree(probe, ignore_errors=True)


class OverlayRootfs:
    """A bake's rootfs: ``lowers`` (bottom first) read-only below, changes in ``staging``.

    The caller keeps the lower dirs from being removed while mounted (the
    bake holds their snapshots, see :meth:`kiln.image.snapshots.SnapshotStore.hold`).
    """

    def __init__(self, lowers: Sequence[Path], staging: Path) -> None:
        self.lowers = tuple(Path(lower) for lower in lowers)
        self.upper = Path(staging) / "upper"
        self.work = Path(staging) / "work"
        self.merged = Path(staging) / "rootfs"
        self.mounted = False

    def mount(self) -> Path:
        for path in (self.upper, self.work, self.merged):
            path.mkdir(mode=0o755)
        execute(
            overlay_mount_argv(self.lowers, self.upper, self.work, self.merged),
            f"mount the rootfs over {len(self.lowers)} layers",
        )
        self.mounted = True
        # The merged root reports the upper dir's owner, mode and times: make them the top layer's.
        st = os.lstat(self.lowers[-1])
        os.chown(self.merged, st.st_uid, st.st_gid)
        os.chmod(self.merged, stat.S_IMODE(st.st_mode))
        os.utime(self.merged, ns=(st.st_atime_ns, st.st_mtime_ns))
        return self.merged

    def unmount(self) -> bool:
        """True when the merged view is gone and the staging dir may be removed."""
        if self.mounted:
            self.mounted = not unmount(self.merged)
        return not self.mounted

    def copy_up_directories(self) -> None:
        """Copy every directory up now, so no later copy-up changes one under a snapshot."""
        stack = [self.merged]
        while stack:
            current = stack.pop()
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        os.chown(entry.path, st.st_uid, st.st_gid, follow_symlinks=False)
                        stack.append(Path(entry.path))

    def settle(self, before: Snapshot, after: Snapshot) -> Snapshot:
        """``after`` without the changes that copy-up alone made.

        A lower file copied up during the step has a new ctime, and so has its
        directory, whose mtime overlayfs restores. A file whose only change
        is that ctime and whose bytes equal the lower file's is shown unchanged; so
        is a directory whose only change is its ctime when a file in it was
        copied up. On a plain tree neither would have changed.
        """
        paths = dict(after.paths)
        parents: set[str] = set()
        for rel, now in after.paths.items():
            old = before.paths.get(rel)
            if old is None or old == now or not stat.S_ISREG(now.mode):
                continue
            lower = self._lower_file(rel, old)
            if lower is None:
                continue  # it was already in the upper dir: a ctime change is a real change
            parents.add(rel.rpartition("/")[0])
            if _ctime_only(old, now) and _same_bytes(self.merged / rel, lower):
                paths[rel] = old
        for rel in parents:
            was, dir_now = before.paths.get(rel), after.paths.get(rel)
            if was is not None and dir_now is not None and _ctime_only(was, dir_now):
                paths[rel] = was
        return Snapshot(after.root, paths)

    def _lower_file(self, rel: str, seen: PathState) -> Path | None:
        """The lower file the merged view showed as ``seen`` (same inode and ctime), if any."""
        for lower in reversed(self.lowers):
            try:
                st = os.lstat(lower / rel)
            except OSError:
                continue
            if (st.st_ino, st.st_ctime_ns) == (seen.inode, seen.ctime_ns):
                return lower / rel
        return None


def _ctime_only(old: PathState, now: PathState) -> bool:
    return old != now and replace(now, ctime_ns=old.ctime_ns) == old


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                ca = fa.read(_CHUNK)
                if ca != fb.read(_CHUNK):
                    return False
                if not ca:
                    return True
    except OSError:
        return False
