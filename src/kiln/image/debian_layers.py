"""The layers of a ``debian:SUITE`` base: the shared minimal tree, then the recipe's packages.

Where each comes from, fastest first:

1. the home's layer cache (a re-bake with the lock: no tree is touched);
2. the machine's shared bases (:mod:`kiln.image.basecache`): the minimal
   tree and its layer, and a packages layer made earlier over the same tree
   from the same packages, whichever home made them;
3. built here: mmdebstrap for the minimal tree (then kept in the shared
   cache), apt in a chroot over an overlay of that tree for the packages,
   from ``.deb`` files the host downloaded (the install itself has no network).

Either way the layers are the same bytes: the minimal tree is pinned to the
lock's base versions and settled as its layer unpacks, and the packages
layer is the same install from the same files over the same tree. With the
shared cache switched off (``KILN_BASE_CACHE=off``) every bake builds both in
private, as it would on a fresh machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from kiln.errors import KilnError
from kiln.image import debian
from kiln.image.basecache import BaseCache, SharedLayer, base_cache
from kiln.image.cache import CachedLayer, LayerCache
from kiln.image.command import TAIL_LINES, Interrupted, run_logged
from kiln.image.digest import MEDIA_TYPE_LAYER_GZIP
from kiln.image.store import ImageStore

if TYPE_CHECKING:
    from kiln.image.layer import LayerResult
    from kiln.image.snapshots import SnapshotStore

__all__ = ["DebianLayers", "DebianRequest", "debian_layers"]

DEBIAN_TMP_PREFIX = "kiln-debian-"
_POLL = 0.05


@dataclass
class DebianRequest:
    """What one image's Debian base needs from its bake."""

    image: str
    where: str
    base: debian.DebianBase
    entry: debian.LockEntry | None
    """The lock's entry (None: resolve anew, as a first bake or ``--update-lock`` does)."""
    epoch: int
    store: ImageStore
    cache: LayerCache
    deb_cache: Path
    apt_state: Path
    staging: Callable[[], Path]
    """The bake's own staging dir (made on first use), where overlays are mounted."""
    log: Path
    event: Callable[[str], None]
    status: Callable[[str], None]
    interrupted: threading.Event
    """Set on Ctrl-C: commands, waits for locks and layer writing stop."""
    no_cache: bool = False
    update_lock: bool = False
    fresh_bases: dict[str, str] = field(default_factory=dict)
    """Minimal bases this bake made from the mirror, by suite (shared by its images)."""
    snapshots: SnapshotStore | None = None
    overlay_usable: Callable[[], bool] = lambda: False


@dataclass
class DebianLayers:
    """The base's layers (bottom first) with their history lines, and the lock entry to
    write when it changed (None: the lock stays as it is)."""

    layers: list[tuple[CachedLayer, str]] = field(default_factory=list)
    built: bool = False
    lock_entry: debian.LockEntry | None = None


@dataclass
class _Tree:
    """A minimal base tree in use: shared (held with a shared lock) or this bake's own."""

    key: str
    fs: Path
    packages: dict[str, str]
    layer: CachedLayer
    private_dir: Path | None = None


def debian_layers(request: DebianRequest) -> DebianLayers:
    return _DebianBake(request).run()


class _DebianBake:
    def __init__(self, request: DebianRequest) -> None:
        self.r = request
        self.base = request.base
        self.shared = base_cache()
        entry = request.entry
        self.locked: dict[str, str] | None = dict(entry.packages) if entry else None
        self.hook = debian.uses_merged_usr_hook(self.locked)
        self.built = False
        self._lists_fresh = False
        self._log: TextIO | None = None

    # -- the whole step --------------------------------------------------------

    def run(self) -> DebianLayers:
        cached = self._from_home_cache()
        if cached is not None:
            return cached
        if os.geteuid() != 0:
            raise KilnError(f"{self.r.where}.from: a Debian base needs root (mmdebstrap, apt)")
        self.r.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.r.log, "w") as self._log, self._base_tree() as tree:
                return self._with_tree(tree)
        finally:
            self._log = None

    def _with_tree(self, tree: _Tree) -> DebianLayers:
        base = self.base
        result = DebianLayers()
        result.layers.append((tree.layer, self._base_history()))
        entry = self.r.entry
        if base.packages:
            if entry is not None and entry.base is not None:
                install, expected = entry.layer_packages(), dict(entry.packages)
            elif entry is not None:
                expected = dict(entry.packages)
                install = {n: v for n, v in expected.items() if tree.packages.get(n) != v}
            else:
                install, expected = self._resolve(tree)
            layer = self._packages(tree, install, expected)
            result.layers.append((layer, self._packages_history()))
        else:
            expected = dict(tree.packages)
            if entry is not None:
                debian.verify_installed(expected, entry.packages, self._where_lock())
        result.built = self.built
        if entry is None or entry.base is None:
            result.lock_entry = debian.LockEntry(
                base.suite, base.architecture, base.packages, expected, dict(tree.packages)
            )
        return result

    def _base_history(self) -> str:
        return f"kiln: mmdebstrap --variant={debian.VARIANT} {self.base.suite}"

    def _packages_history(self) -> str:
        return "kiln: apt-get install " + " ".join(self.base.packages)

    def _where_lock(self) -> str:
        return f"{self.r.where}.from (debian:{self.base.suite}, kiln.lock)"

    # -- 1. the home's layer cache -------------------------------------------------

    def _base_key(self, packages: Mapping[str, str]) -> str:
        return BaseCache.base_key(
            self.base.suite,
            self.base.architecture,
            debian.VARIANT,
            self.hook,
            self.r.epoch,
            packages,
        )

    def _layer_key(self, base_diff_id: str, install: Mapping[str, str]) -> str:
        return BaseCache.layer_key(base_diff_id, install, self.base.packages, self.r.epoch)

    def _lookup(self, key: str, *, empty: bool = False) -> CachedLayer | None:
        """A layer of the home's cache (``empty``: a step that changed nothing counts too)."""
        if self.r.no_cache:
            return None
        hit = self.r.cache.get(key, self.r.store)
        if hit is None or (hit.descriptor is None and not empty):
            return None
        return hit

    def _from_home_cache(self) -> DebianLayers | None:
        entry = self.r.entry
        if entry is None or entry.base is None:
            return None
        base_layer = self._lookup(self._base_key(entry.base))
        if base_layer is None or base_layer.diff_id is None:
            return None
        result = DebianLayers()
        result.layers.append((base_layer, self._base_history()))
        if self.base.packages:
            key = self._layer_key(base_layer.diff_id, entry.layer_packages())
            layer = self._lookup(key, empty=True)
            if layer is None:
                return None
            result.layers.append((layer, self._packages_history()))
        return result

    # -- 2. the minimal base tree ------------------------------------------------------

    @contextlib.contextmanager
    def _base_tree(self) -> Iterator[_Tree]:
        entry = self.r.entry
        pins = entry.base if entry is not None else None
        legacy = entry is not None and entry.base is None
        if self.shared is not None:
            stack, tree = self._shared_tree(pins, legacy)
            with stack:
                yield tree
            return
        private = self._private_tree(pins, legacy)
        try:
            yield private
        finally:
            self._keep_or_remove(private)

    def _shared_tree(
        self, pins: Mapping[str, str] | None, legacy: bool
    ) -> tuple[contextlib.ExitStack, _Tree]:
        """A shared base for this request, held (a shared lock) until the stack closes;
        made now when none fits, or when the one there fails its checks."""
        shared = self.shared
        assert shared is not None
        shared.sweep()
        make: Callable[[], str]
        key: str | None
        if pins is not None:
            key = self._base_key(pins)
            make = functools.partial(self._build_shared_pinned, key, pins)
        elif legacy:
            key = self._legacy_candidate()
            make = self._build_shared_for_legacy
        else:
            # The base new locks start from; `--update-lock` makes a fresh one from the
            # mirror once per bake, as `docker pull` refreshes a tag.
            key = self.r.fresh_bases.get(self._suite_name())
            if key is None and not self.r.update_lock:
                key = shared.current(self.base.suite, self.base.architecture, self.r.epoch)
            make = self._build_shared_unpinned
        held = self._held(key) if key is not None else None
        for _attempt in range(2):  # the second only when what was made fails its checks
            if held is not None:
                return held
            key = make()
            held = self._held(key)
        if held is not None:
            return held
        raise KilnError(
            f"{self.r.where}.from: the shared base {str(key)[:12]} in {shared.root} "
            "fails its checks right after it was made"
        )

    def _held(self, key: str) -> tuple[contextlib.ExitStack, _Tree] | None:
        """The verified base of ``key`` with its layer in the home's store, held with a
        shared lock; None when it is missing or fails a check (then it is discarded)."""
        shared = self.shared
        assert shared is not None
        name = f"base-{key[:32]}"
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(shared.lock(name, exclusive=False, cancelled=self.r.interrupted))
            found = shared.base(key)
            layer = self._import(found.layer) if found is not None else None
        except BaseException:
            stack.close()
            raise
        if found is not None and layer is not None:
            self.r.cache.put(self._base_key(found.packages), layer)
            self._event(
                f"minimal base debian:{self.base.suite}/{self.base.architecture}: "
                f"{len(found.packages)} packages, shared in {shared.root}"
            )
            return stack, _Tree(key, found.fs, dict(found.packages), layer)
        stack.close()
        if found is not None:
            with shared.lock(name, exclusive=True, cancelled=self.r.interrupted):
                shared.discard("base", key)
        return None

    def _import(self, layer: SharedLayer) -> CachedLayer | None:
        """The shared blob copied into the home's store, its hash checked on the way."""
        store = self.r.store
        if not store.has(layer.digest):
            stored = store.put_file(layer.blob, MEDIA_TYPE_LAYER_GZIP)
            if stored.digest != layer.digest:
                return None
        return CachedLayer(layer.descriptor, layer.diff_id, layer.size_uncompressed)

    def _legacy_candidate(self) -> str | None:
        """For a lock written before bases were kept apart: a shared base whose every
        package is in the lock at the same version (the largest such)."""
        shared = self.shared
        assert shared is not None and self.locked is not None
        best: tuple[int, str] | None = None
        for key, record in shared.records().items():
            packages = record.get("packages")
            if not isinstance(packages, dict) or not self._same_request(record):
                continue
            fits = all(self.locked.get(n) == v for n, v in packages.items())
            if fits and (best is None or len(packages) > best[0]):
                best = (len(packages), key)
        return best[1] if best is not None and shared.base(best[1]) is not None else None

    def _same_request(self, record: Mapping[str, object]) -> bool:
        return (
            record.get("suite") == self.base.suite
            and record.get("architecture") == self.base.architecture
            and record.get("variant") == debian.VARIANT
            and record.get("merged_usr_hook") == self.hook
            and record.get("epoch") == self.r.epoch
        )

    def _check_legacy(self, packages: Mapping[str, str]) -> None:
        assert self.locked is not None
        stale = sorted(n for n, v in packages.items() if self.locked.get(n) != v)
        if stale:
            shown = ", ".join(stale[:5]) + (", …" if len(stale) > 5 else "")
            raise KilnError(
                f"{self._where_lock()}: the lock was written before Kiln kept the minimal "
                f"base apart, and the mirror's minimal base no longer matches it ({shown}) — "
                "run `kiln bake --update-lock` to re-resolve"
            )

    def _build_shared_pinned(self, key: str, pins: Mapping[str, str]) -> str:
        shared = self.shared
        assert shared is not None
        with shared.lock(f"base-{key[:32]}", exclusive=True, cancelled=self.r.interrupted):
            if shared.base(key) is None:  # else another bake made it while this one waited
                self._publish(self._build(pins), locked=True)
        return key

    def _suite_name(self) -> str:
        return f"{self.base.suite}-{self.base.architecture}-{self.r.epoch}"

    def _build_shared_unpinned(self) -> str:
        """A base from the mirror's newest packages, made current; one bake at a time
        makes it, and one that waited takes what the other made."""
        shared = self.shared
        assert shared is not None
        name = self._suite_name()
        with shared.lock(f"current-{name}", exclusive=True, cancelled=self.r.interrupted):
            key = self.r.fresh_bases.get(name)
            if key is None and not self.r.update_lock:
                waited = shared.current(self.base.suite, self.base.architecture, self.r.epoch)
                key = waited if waited is not None and shared.base(waited) else None
            if key is None:
                key = self._publish(self._build(None))
                shared.set_current(self.base.suite, self.base.architecture, self.r.epoch, key)
                self.r.fresh_bases[name] = key
        return key

    def _build_shared_for_legacy(self) -> str:
        built = self._build(None)
        try:
            self._check_legacy(built.packages)
        except BaseException:
            shutil.rmtree(built.private_dir or built.fs, ignore_errors=True)
            raise
        key = self._publish(built)
        shared = self.shared
        if self.hook and shared is not None:
            shared.set_current(self.base.suite, self.base.architecture, self.r.epoch, key)
        return key

    def _publish(self, built: _Tree, *, locked: bool = False) -> str:
        """Move a tree this bake built into the shared cache (under its key's exclusive
        lock, which ``locked`` says the caller holds already)."""
        shared = self.shared
        assert shared is not None and built.private_dir is not None
        key = self._base_key(built.packages)
        layer = built.layer
        assert layer.descriptor is not None and layer.diff_id is not None
        name = f"base-{key[:32]}"
        try:
            with contextlib.ExitStack() as stack:
                if not locked:
                    stack.enter_context(
                        shared.lock(name, exclusive=True, cancelled=self.r.interrupted)
                    )
                staging = stack.enter_context(shared.staging())
                shared.publish_base(
                    staging,
                    key,
                    built.fs,
                    self.r.store.blob_path(layer.descriptor.digest),
                    {
                        "digest": layer.descriptor.digest,
                        "diff_id": layer.diff_id,
                        "size": layer.descriptor.size,
                        "size_uncompressed": layer.size_uncompressed,
                    },
                    {
                        "suite": self.base.suite,
                        "architecture": self.base.architecture,
                        "variant": debian.VARIANT,
                        "merged_usr_hook": self.hook,
                        "epoch": self.r.epoch,
                        "built": int(time.time()),
                    },
                    built.packages,
                )
        finally:
            shutil.rmtree(built.private_dir, ignore_errors=True)
        return key

    def _private_tree(self, pins: Mapping[str, str] | None, legacy: bool) -> _Tree:
        tree = self._build(pins)
        if legacy:
            try:
                self._check_legacy(tree.packages)
            except BaseException:
                self._keep_or_remove(tree)
                raise
        return tree

    def _keep_or_remove(self, tree: _Tree) -> None:
        """A private tree becomes the home's snapshot of its layer (renamed, owners
        shifted) when snapshots are in use; otherwise it goes."""
        if tree.private_dir is None:
            return
        snapshots = self.r.snapshots
        if snapshots is not None and self.r.overlay_usable() and tree.fs.is_dir():
            from kiln.image.base import BaseLayer

            layer = tree.layer
            assert layer.descriptor is not None and layer.diff_id is not None
            with contextlib.suppress(KilnError, OSError):
                snapshots.adopt(
                    tree.fs,
                    BaseLayer(layer.descriptor, layer.diff_id, f"debian:{self.base.suite}"),
                )
        shutil.rmtree(tree.private_dir, ignore_errors=True)

    def _build(self, pins: Mapping[str, str] | None) -> _Tree:
        """mmdebstrap's minimal tree in a private temp dir, settled, and its layer stored.

        The tree is built in the temp dir, not in ``KILN_HOME`` or the shared
        cache: apt drops to the ``_apt`` user for downloads, and where that
        user cannot reach the tree (a 0700 parent) it leaves
        ``var/lib/apt/lists/partial`` owned by root, so the layer would depend
        on where the tree was built.
        """
        from kiln.image.layer import layer_from_dir

        blocker = debian.mmdebstrap_blocker()
        if blocker is not None:
            raise KilnError(f"{self.r.where}.from: {blocker}")
        base = self.base
        private = Path(tempfile.mkdtemp(prefix=f"{DEBIAN_TMP_PREFIX}{os.getpid()}-{self.r.image}-"))
        try:
            os.chmod(private, 0o711)
            out = private / "rootfs"
            scratch = private / "tmp"
            scratch.mkdir(mode=0o700)
            self.r.deb_cache.mkdir(parents=True, exist_ok=True)
            landing = debian.landing_dir(self.r.deb_cache)
            argv = debian.mmdebstrap_argv(
                base.suite,
                base.architecture,
                output=out,
                deb_cache=self.r.deb_cache,
                landing=landing,
                pins=pins,
                merged_usr_hook=self.hook,
            )
            if self.shared is None:
                kept = "the shared cache is off"
            elif self.r.update_lock and pins is None:
                kept = "--update-lock: the mirror's newest"
            else:
                kept = "once per machine"
            self._event(
                f"building the minimal base debian:{base.suite}/{base.architecture} with "
                f"mmdebstrap ({kept}; log: {self.r.log})"
            )
            try:
                self._run(argv, "mmdebstrap", env=debian.build_env(self.r.epoch, scratch))
                debian.keep_downloads(landing, self.r.deb_cache)
            finally:
                shutil.rmtree(landing, ignore_errors=True)
            installed = debian.installed_packages(out)
            if not installed:
                raise KilnError(f"{self.r.where}.from: mmdebstrap left no dpkg status in {out}")
            if pins is not None:
                debian.verify_installed(installed, pins, self._where_lock())
            debian.finish_tree(out, self.r.epoch)
            result = layer_from_dir(out, self.r.store, self.r.epoch, cancelled=self.r.interrupted)
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        self.built = True
        layer = CachedLayer(result.descriptor, result.diff_id, result.size_uncompressed)
        self.r.cache.put(self._base_key(installed), layer)
        return _Tree(self._base_key(installed), out, installed, layer, private)

    # -- 3. the packages layer ------------------------------------------------------------

    def _resolve(self, tree: _Tree) -> tuple[dict[str, str], dict[str, str]]:
        """What apt installs over ``tree`` for the requested packages, at the mirror's
        newest versions: (the packages layer's packages, the whole image's)."""
        apt = self._host_apt()
        status = tree.fs / debian.DPKG_STATUS
        self._event(f"resolving {' '.join(self.base.packages)} with apt (log: {self.r.log})")
        with self._apt_lock():  # its configuration names this tree's status: written inside
            env = apt.env(status, self.r.epoch)
            self._update_lists(apt, env)
            code, lines = self._command(apt.simulate_argv(self.base.packages), env)
        if code != 0:
            raise KilnError(
                f"{self.r.where}.packages: apt cannot install {' '.join(self.base.packages)} "
                f"on debian:{self.base.suite}:\n" + "\n".join(lines[-TAIL_LINES:])
            )
        plan = debian.parse_apt_simulation("\n".join(lines))
        expected = {n: v for n, v in tree.packages.items() if n not in plan.remove}
        expected.update(plan.install)
        return dict(plan.install), expected

    def _update_lists(self, apt: debian.HostApt, env: Mapping[str, str]) -> None:
        if not self._lists_fresh:
            self._run(apt.update_argv(), "apt-get update", env=env)
            self._lists_fresh = True

    def _host_apt(self) -> debian.HostApt:
        return debian.HostApt(
            self.r.apt_state, self.r.deb_cache, self.base.suite, self.base.architecture
        )

    @contextlib.contextmanager
    def _apt_lock(self) -> Iterator[None]:
        """One bake at a time configures apt, updates and reads the shared package lists."""
        self.r.apt_state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.r.apt_state / "kiln.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self.r.interrupted.is_set():
                        raise Interrupted() from None
                    time.sleep(_POLL)
            yield
        finally:
            os.close(fd)

    def _download(self, tree: _Tree, packages: Mapping[str, str]) -> None:
        """Fetch the ``.deb`` files the download cache lacks (the install has no network)."""
        missing = debian.missing_debs(self.r.deb_cache, packages, self.base.architecture)
        if not missing:
            return
        apt = self._host_apt()
        self._event(f"downloading {len(missing)} packages (log: {self.r.log})")
        with self._apt_lock():
            env = apt.env(tree.fs / debian.DPKG_STATUS, self.r.epoch)
            self._update_lists(apt, env)
            self.r.deb_cache.mkdir(parents=True, exist_ok=True)
            landing = debian.landing_dir(self.r.deb_cache)
            try:
                code, lines = self._command(apt.download_argv(missing), env, cwd=landing)
                if code != 0:
                    raise KilnError(
                        f"{self._where_lock()}: cannot download "
                        f"{', '.join(f'{n}={v}' for n, v in sorted(missing.items()))} from "
                        f"{debian.DEBIAN_MIRROR}; if the mirror moved on, run "
                        "`kiln bake --update-lock`:\n" + "\n".join(lines[-TAIL_LINES:])
                    )
                debian.keep_downloads(landing, self.r.deb_cache)
            finally:
                shutil.rmtree(landing, ignore_errors=True)
        still = debian.missing_debs(self.r.deb_cache, packages, self.base.architecture)
        if still:
            raise KilnError(
                f"{self._where_lock()}: apt downloaded no file for "
                + ", ".join(f"{n}={v}" for n, v in sorted(still.items()))
            )

    def _packages(
        self, tree: _Tree, install: Mapping[str, str], expected: Mapping[str, str]
    ) -> CachedLayer:
        assert tree.layer.diff_id is not None
        key = self._layer_key(tree.layer.diff_id, install)
        hit = self._lookup(key, empty=True)
        if hit is not None:
            return hit
        shared = self.shared
        if shared is not None and not self.r.no_cache:
            found = shared.layer(key)
            layer = self._import(found) if found is not None else None
            if found is not None and layer is None:
                with shared.lock(f"layer-{key[:32]}", exclusive=True, cancelled=self.r.interrupted):
                    shared.discard("layer", key)  # its blob failed its hash: make it again
            if layer is not None:
                self._event(
                    f"packages layer of {' '.join(self.base.packages)}: shared in {shared.root}"
                )
                self.r.cache.put(key, layer)
                return layer
        self._download(tree, install)
        result = self._install(tree, install, expected)
        self.built = True
        if result is None:
            layer = CachedLayer(None, None, 0)
        else:
            layer = CachedLayer(result.descriptor, result.diff_id, result.size_uncompressed)
            if shared is not None:
                self._publish_layer(key, result)
        self.r.cache.put(key, layer)
        return layer

    def _publish_layer(self, key: str, result: LayerResult) -> None:
        shared = self.shared
        assert shared is not None
        with (
            shared.lock(f"layer-{key[:32]}", exclusive=True, cancelled=self.r.interrupted),
            shared.staging() as staging,
        ):
            shared.publish_layer(
                staging,
                key,
                self.r.store.blob_path(result.descriptor.digest),
                {
                    "digest": result.descriptor.digest,
                    "diff_id": result.diff_id,
                    "size": result.descriptor.size,
                    "size_uncompressed": result.size_uncompressed,
                },
            )

    def _install(
        self, tree: _Tree, install: Mapping[str, str], expected: Mapping[str, str]
    ) -> LayerResult | None:
        """apt installs the files over ``tree`` (an overlay: the tree is never written);
        the layer is what changed, checked against ``expected``."""
        from kiln.image import overlay
        from kiln.image.basecache import copy_tree
        from kiln.image.layer import layer_from_diff, snapshot

        debs = [
            debian.find_deb(self.r.deb_cache, name, version, self.base.architecture)
            for name, version in sorted(install.items())
        ]
        files = [deb for deb in debs if deb is not None]
        names = " ".join(self.base.packages)
        self._event(f"installing {names} ({len(files)} packages) over the minimal base")
        staging = self.r.staging() / f"packages-{uuid.uuid4().hex[:8]}"
        staging.mkdir(mode=0o700)
        rootfs: overlay.OverlayRootfs | None = None
        try:
            if self.r.overlay_usable() and overlay.options_fit(
                [tree.fs], staging / "upper", staging / "work"
            ):
                rootfs = overlay.OverlayRootfs([tree.fs], staging)
                root = rootfs.mount()
                rootfs.copy_up_directories()
            else:
                root = staging / "rootfs"
                copy_tree(tree.fs, root)
            debian.prepare_install(root)
            before = snapshot(root)
            argv = debian.install_argv(root, files, self.r.deb_cache, self.base.packages)
            self._run(argv, "apt-get install", env=debian.build_env(self.r.epoch))
            debian.clean_after_install(root)
            after = snapshot(root)
            if rootfs is not None:
                after = rootfs.settle(before, after)
            debian.verify_installed(debian.installed_packages(root), expected, self._where_lock())
            return layer_from_diff(
                root, before, after, self.r.store, self.r.epoch, cancelled=self.r.interrupted
            )
        finally:
            unmounted = rootfs is None or rootfs.unmount()
            if unmounted and not overlay.mounts_under(staging):
                shutil.rmtree(staging, ignore_errors=True)

    # -- commands -----------------------------------------------------------------

    def _command(
        self, argv: list[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> tuple[int, list[str]]:
        """Run a command, its output to the log; returns its exit code and every line."""
        lines: list[str] = []

        def on_line(line: str) -> None:
            lines.append(line)
            self.r.status(line)

        code, _tail = run_logged(
            argv, log=self._log, on_line=on_line, env=env, cwd=cwd, cancelled=self.r.interrupted
        )
        return code, lines

    def _run(self, argv: list[str], what: str, *, env: Mapping[str, str]) -> None:
        code, lines = self._command(argv, env)
        if code != 0:
            raise KilnError(
                f"{self.r.where}.from: {what} failed with exit {code}; its last lines "
                f"(the whole output is in {self.r.log}):\n" + "\n".join(lines[-TAIL_LINES:])
            )

    def _event(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"kiln: {text}\n")
            self._log.flush()
        self.r.event(text)
