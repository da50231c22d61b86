"""Unpacked base layers kept on disk and shared read-only through overlayfs.

Unpacking a 150 MB Debian base in Python takes seconds, and a bake whose app
changed needs it for every ``run`` step that misses the cache. So the tree of
a recipe's base layers is kept in ``$KILN_HOME/cache/trees/<chain key>/rootfs``
(written once: unpacked in a temp dir, then renamed) and a bake's rootfs is an
overlay mount over it: the tree is the read-only lower dir, the upper and work
dirs lie in the bake's staging dir, and the merged view is what the layers
after the base are applied to, what ``run`` steps see through bwrap, and what
``snapshot``/``layer_from_diff`` read. Overlayfs never writes to a lower dir,
so concurrent bakes share a tree safely.

Two overlay effects would make a step's layer differ from the one the same
step writes over a plain tree, and both are undone here:

* Copying up a directory (any change below it copies up its parents) gives it
  a new ctime, and a merged directory reports ``nlink`` 1. So every directory
  is copied up once before the first snapshot (:meth:`OverlayRootfs.copy_up_directories`);
  from then on the upper directories behave exactly like plain ones.
* Opening a base file for writing copies it up (new ctime) even when nothing
  is written, as ``apt`` does with its lock files. :meth:`OverlayRootfs.settle`
  treats a file whose only change is the ctime of its copy-up, and whose bytes
  equal the tree's, as unchanged — as the plain tree sees it.

Mount options: ``index=on`` keeps hard links of the base linked across copy-up
(a write through one name shows through the other, as on a plain tree) and
``redirect_dir=on`` lets a step rename a base directory instead of failing
with EXDEV.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from kiln.errors import KilnError
from kiln.image.digest import canonical_json, sha256_hex
from kiln.image.layer import PathState, Snapshot

OVERLAY_OPTIONS = ("index=on", "redirect_dir=on")
_NEW_PREFIX = ".new-"
_CHAIN_FILE = "chain.json"
_CHUNK = 1 << 20
# Characters that the overlay mount option string cannot carry in a path unescaped.
_UNSAFE_IN_OPTIONS = frozenset(",:\\\n")


def chain_key(diff_ids: Sequence[str]) -> str:
    return sha256_hex(canonical_json(list(diff_ids)))


@dataclass(frozen=True)
class TreeLayer:
    """One layer of a chain to unpack: its ids and how to open its blob."""

    diff_id: str
    digest: str
    source: str
    open_blob: Callable[[], contextlib.AbstractContextManager[BinaryIO]]


class TreeCache:
    """``$KILN_HOME/cache/trees``: one read-only unpacked tree per layer chain."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def tree(self, diff_ids: Sequence[str]) -> Path:
        return self.root / chain_key(diff_ids)

    def longest_prefix(self, diff_ids: Sequence[str]) -> tuple[int, Path] | None:
        """The longest non-empty prefix of ``diff_ids`` with a tree: (its length, the tree)."""
        for length in range(len(diff_ids), 0, -1):
            tree = self.tree(diff_ids[:length])
            if (tree / "rootfs").is_dir() and (tree / _CHAIN_FILE).is_file():
                return length, tree
        return None

    def _staging(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{_NEW_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir(mode=0o700)
        return path

    def _publish(self, staged: Path, layers: Sequence[TreeLayer]) -> Path:
        chain = {
            "diff_ids": [layer.diff_id for layer in layers],
            "digests": [layer.digest for layer in layers],
        }
        (staged / _CHAIN_FILE).write_bytes(canonical_json(chain))
        os.chmod(staged, 0o755)
        final = self.tree(chain["diff_ids"])
        try:
            os.rename(staged, final)
        except OSError:
            if not (final / _CHAIN_FILE).is_file():
                shutil.rmtree(staged, ignore_errors=True)
                raise
            shutil.rmtree(staged, ignore_errors=True)  # another bake published it first
        return final

    def adopt(self, rootfs: Path, layers: Sequence[TreeLayer]) -> Path | None:
        """Move an already unpacked ``rootfs`` (mmdebstrap's) in as the tree of ``layers``.

        Returns the tree, or None when ``rootfs`` lies on another filesystem
        (a rename cannot move it) — then it stays where it is.
        """
        staged = self._staging()
        try:
            os.rename(rootfs, staged / "rootfs")
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
            return None
        return self._publish(staged, layers)

    def build(self, layers: Sequence[TreeLayer]) -> Path:
        """Unpack ``layers`` with the one safe extractor into a new tree."""
        from kiln.image.unpack import apply_layer

        staged = self._staging()
        try:
            rootfs = staged / "rootfs"
            rootfs.mkdir(mode=0o755)
            for layer in layers:
                with layer.open_blob() as blob:
                    apply_layer(blob, rootfs, source=layer.source)
            return self._publish(staged, layers)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def chains(self) -> dict[Path, list[str]]:
        """Every published tree and the layer digests of its chain."""
        out: dict[Path, list[str]] = {}
        if not self.root.is_dir():
            return out
        for tree in self.root.iterdir():
            if tree.name.startswith(_NEW_PREFIX):
                continue
            try:
                data = json.loads((tree / _CHAIN_FILE).read_bytes())
                out[tree] = [str(d) for d in data["digests"]]
            except (OSError, ValueError, KeyError, TypeError):
                out[tree] = []
        return out

    def remove_unreferenced(self, keep: Callable[[list[str]], bool]) -> int:
        """Remove trees whose chain ``keep`` rejects and no bake holds; returns bytes freed."""
        freed = 0
        for tree, digests in self.chains().items():
            if digests and keep(digests):
                continue
            try:
                fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # a bake has it mounted
            try:
                freed += tree_size(tree)
                shutil.rmtree(tree, ignore_errors=True)
            finally:
                os.close(fd)
        return freed


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


# -- mounts -----------------------------------------------------------------


def overlay_mount_argv(lower: Path, upper: Path, work: Path, merged: Path) -> list[str]:
    options = ",".join(
        (f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}", *OVERLAY_OPTIONS)
    )
    return ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)]


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
    base into staging as they always did.
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
        try:
            execute(overlay_mount_argv(*dirs), "overlay probe")
        except KilnError:
            return False
        return unmount(dirs[3])
    finally:
        if not mounts_under(probe):
            shutil.rmtree(probe, ignore_errors=True)


class OverlayRootfs:
    """A bake's rootfs: ``tree/rootfs`` read-only below, changes in ``staging``.

    The tree's directory is held with a shared ``flock`` while mounted, so
    ``kiln image gc`` leaves it alone.
    """

    def __init__(self, tree: Path, staging: Path) -> None:
        self.tree = Path(tree)
        self.lower = self.tree / "rootfs"
        self.upper = Path(staging) / "upper"
        self.work = Path(staging) / "work"
        self.merged = Path(staging) / "rootfs"
        self._hold: int | None = None
        self.mounted = False

    def mount(self) -> Path:
        for path in (self.upper, self.work, self.merged):
            path.mkdir(mode=0o755)
        self._hold = os.open(self.tree, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._hold, fcntl.LOCK_SH)
        try:
            execute(
                overlay_mount_argv(self.lower, self.upper, self.work, self.merged),
                f"mount the rootfs over {self.tree.name[:12]}",
            )
        except BaseException:
            self._release()
            raise
        self.mounted = True
        # The merged root reports the upper dir's mode and times: make them the tree's.
        st = os.lstat(self.lower)
        os.chown(self.merged, st.st_uid, st.st_gid)
        os.chmod(self.merged, stat.S_IMODE(st.st_mode))
        os.utime(self.merged, ns=(st.st_atime_ns, st.st_mtime_ns))
        return self.merged

    def unmount(self) -> bool:
        """True when the merged view is gone and the staging dir may be removed."""
        if self.mounted:
            self.mounted = not unmount(self.merged)
        if not self.mounted:
            self._release()
        return not self.mounted

    def _release(self) -> None:
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None

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

        A base file copied up during the step has a new ctime, and so has its
        directory, whose mtime overlayfs restores. A file whose only change
        is that ctime and whose bytes equal the tree's is shown unchanged; so
        is a directory whose only change is its ctime when a file in it was
        copied up. On a plain tree neither would have changed.
        """
        paths = dict(after.paths)
        parents: set[str] = set()
        for rel, now in after.paths.items():
            old = before.paths.get(rel)
            if old is None or old == now or not stat.S_ISREG(now.mode):
                continue
            try:
                lower = os.lstat(self.lower / rel)
            except OSError:
                continue
            if (lower.st_ino, lower.st_ctime_ns) != (old.inode, old.ctime_ns):
                continue  # it was already in the upper dir: a ctime change is a real change
            parents.add(rel.rpartition("/")[0])
            if _ctime_only(old, now) and _same_bytes(self.merged / rel, self.lower / rel):
                paths[rel] = old
        for rel in parents:
            was, dir_now = before.paths.get(rel), after.paths.get(rel)
            if was is not None and dir_now is not None and _ctime_only(was, dir_now):
                paths[rel] = was
        return Snapshot(after.root, paths)


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
