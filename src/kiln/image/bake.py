"""The bake executor: recipes in, content-addressed images out.

A bake walks each recipe's steps with a running chain of layer diff_ids.
Every layer-producing step (a Debian base, ``copy``, ``run``) has a cache
key derived from that chain and the step's inputs (see :mod:`kiln.image.cache`);
a hit appends the cached layer without touching the filesystem. Only when a
``run`` step actually has to run is a root filesystem materialised in
``$KILN_HOME/tmp``: an overlay of the layer snapshots so far (the same ones
instances run from, see :mod:`kiln.image.snapshots`), so a fully cached
re-bake costs a few ``stat`` calls and two small JSON blobs, and a re-bake
after an app edit unpacks only the layers that changed.

Steps run as root of a user namespace mapped to the home's id range, so
the rootfs holds shifted owners: what the bake writes into it is shifted
(``ids``) and what it reads back for a layer is mapped back, so the layers
are byte for byte what they would be without the shift. There is no other
sandbox: without root or runc, a ``run`` step that misses the cache fails.

Images are assembled as canonical JSON and tagged last: an interrupted bake
leaves blobs that nothing points at (swept by ``gc``) and a staging directory
that the next bake removes, never a half-made tag.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.image.base import (
    SCRATCH,
    BaseImage,
    BaseLayer,
    base_kind,
    image_dependency,
    kiln_image_base,
    oci_architecture,
    oci_layout_base,
    registry_base,
    registry_pin_key,
)
from kiln.image.cache import CachedLayer, FileHashCache, LayerCache, normalized_mode, step_key
from kiln.image.command import INTERRUPTED, Interrupted
from kiln.image.digest import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
)
from kiln.image.progress import BakeProgress, SilentProgress
from kiln.image.store import GcResult, ImageStore
from kiln.paths import download_cache, kiln_home, private_dirs
from kiln.process import pid_alive

if TYPE_CHECKING:
    from kiln.image.overlay import OverlayRootfs
    from kiln.image.snapshots import HeldSnapshots, SnapshotStore
    from kiln.oci.idmap import IdRange
    from kiln.spec.models import CopyStep, Recipe, RunStep, Spec

ANNOTATION_REVISION = "org.opencontainers.image.revision"
ANNOTATION_SOURCE = "org.opencontainers.image.source"
HEALTHCHECK_LABEL = "dev.kiln.healthcheck"
MAX_PARALLEL = 4
_STAGING_PREFIX = "bake-"
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class BakeResult:
    name: str
    digest: str
    ref_names: tuple[str, ...]
    layers_built: int
    layers_cached: int
    seconds: float


# -- order ------------------------------------------------------------------


def bake_order(spec: Spec, names: Sequence[str] | None = None) -> list[str]:
    """The recipes to bake, each after the ``image:`` base it needs; cycles are refused."""
    file = spec.path.name
    wanted = list(names) if names else sorted(spec.images)
    for name in wanted:
        if name not in spec.images:
            known = ", ".join(sorted(spec.images)) or "none"
            raise KilnError(f"{file}: no recipe images.{name} (recipes: {known})")
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise KilnError(f"{file}: images.{cycle[0]}.from: cycle {' → '.join(cycle)}")
        recipe = spec.images.get(name)
        if recipe is None:
            raise KilnError(f"{file}: images.{path[-1]}.from: no recipe images.{name}")
        dependency = image_dependency(recipe.from_)
        if dependency is not None:
            visit(dependency, [*path, name])
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name, [])
    return order


# -- provenance -------------------------------------------------------------


@dataclass(frozen=True)
class GitFacts:
    commit: str | None = None
    commit_time: int | None = None
    clean: bool = False
    remote: str | None = None


def git_facts(root: Path) -> GitFacts:
    """HEAD, its time, whether the project's part of the tree is clean, and origin's URL."""
    try:
        from dulwich.repo import Repo

        repo = Repo.discover(str(root))
    except Exception:
        return GitFacts()
    try:
        from dulwich import porcelain  # heavy: only inside a checkout

        head = repo.head()
        commit = repo[head]
        rel = os.path.relpath(root.resolve(), Path(repo.path).resolve())
        prefix = b"" if rel == "." else rel.encode() + b"/"
        status = porcelain.status(repo, untracked_files="no")
        changed = [p for paths in status.staged.values() for p in paths]
        changed += list(status.unstaged)
        clean = not any(
            (p if isinstance(p, bytes) else str(p).encode()).startswith(prefix) for p in changed
        )
        remote: str | None = None
        with contextlib.suppress(KeyError):
            remote = repo.get_config().get((b"remote", b"origin"), b"url").decode()
        commit_time = int(getattr(commit, "commit_time", 0))
        return GitFacts(head.decode(), commit_time, clean, remote)
    except Exception:
        return GitFacts()
    finally:
        repo.close()


def source_date_epoch(root: Path, facts: GitFacts | None = None) -> int:
    """``SOURCE_DATE_EPOCH`` if set, else HEAD's commit time on a clean checkout, else 0."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env is not None:
        try:
            return int(env)
        except ValueError:
            raise KilnError(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds") from None
    facts = facts if facts is not None else git_facts(root)
    if facts.clean and facts.commit_time is not None:
        return facts.commit_time
    return 0


def base_epoch() -> int:
    """Bases do not come from the project's history, so a commit never rebuilds them."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    return int(env) if env and env.isdigit() else 0


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- staging ----------------------------------------------------------------


def staging_root() -> Path:
    return kiln_home() / "tmp"


def bake_log(image: str) -> Path:
    """Where the output of an image's build commands (mmdebstrap, apt) goes: the
    display shows only what they are doing; a failure prints their last lines."""
    logs = kiln_home() / "cache" / "bake-logs"
    private_dirs(logs)
    return logs / f"{image}.log"


def step_ids(home: Path) -> IdRange | None:
    """The ids ``run`` steps are mapped to: the home's range, or None where steps
    cannot run (no root, no runc; see :func:`kiln.image.sandbox.step_blocker`).

    None leaves everything but a ``run`` step's execution as it is (``copy``
    layers, bases and cache hits run nothing in the sandbox, so their digests
    stay the same); a ``run`` step that misses the cache then fails with the reason.
    """
    from kiln.image.sandbox import step_blocker
    from kiln.oci.idmap import id_range

    return None if step_blocker() else id_range(home)


def clean_stale_staging(root: Path, prefix: str = _STAGING_PREFIX) -> None:
    """Staging dirs of bakes that died (SIGKILL, power loss) go at the next bake."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if not path.name.startswith(prefix):
            continue
        try:
            pid = int(path.name[len(prefix) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            from kiln.image.overlay import unmount_all_under

            # A bake killed with its rootfs mounted leaves the overlay behind: unmount
            # first, and never remove through a mount that would not go away.
            if unmount_all_under(path):
                shutil.rmtree(path, ignore_errors=True)


# -- one bake ---------------------------------------------------------------


@dataclass
class _Shared:
    """What the image bakes of one ``bake()`` call share across threads."""

    spec: Spec
    store: ImageStore
    cache: LayerCache
    files: FileHashCache
    progress: BakeProgress
    no_cache: bool
    update_lock: bool
    epoch: int
    facts: GitFacts
    ids: IdRange | None = None
    """Owners in the rootfs are these shifted ids (steps run in a user namespace);
    None: ``run`` steps cannot run here."""
    snapshots: SnapshotStore | None = None
    results: dict[str, BakeResult] = field(default_factory=dict)
    fresh_bases: dict[str, str] = field(default_factory=dict)
    """Debian minimal bases this bake made from the mirror (``kiln.image.debian_layers``)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Another image failed: the others stop before their next step."""
    interrupted: threading.Event = field(default_factory=threading.Event)
    """Ctrl-C: every image stops now (its commands killed, its layer writing cut)
    and cleans up."""


def _env_list_to_dict(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(items, list):
        for item in items:
            key, sep, value = str(item).partition("=")
            if sep:
                out[key] = value
    return out


def _step_label(step: Any) -> str:
    kind = _step_kind(step)
    if kind == "copy":
        return f"copy {step.copy_} → {step.to}"
    if kind == "run":
        text = step.run if isinstance(step.run, str) else " ".join(step.run)
        return "run " + (text if len(text) <= 60 else text[:59] + "…")
    if kind == "env":
        return "env " + " ".join(sorted(step.env))
    return f"workdir {step.workdir}"


def _step_kind(step: Any) -> str:
    for kind, attr in (("copy", "copy_"), ("run", "run"), ("env", "env"), ("workdir", "workdir")):
        if hasattr(step, attr):
            return kind
    raise KilnError(f"unknown step {step!r}")


class _ImageBake:
    def __init__(self, shared: _Shared, name: str, recipe: Recipe) -> None:
        self.shared = shared
        self.name = name
        self.recipe = recipe
        self.where = f"images.{name}"
        self.file = shared.spec.path.name
        self.layers: list[BaseLayer] = []
        self.history: list[dict[str, Any]] = []
        self.inherited: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.workdir = "/"
        self.built = 0
        self.cached = 0
        self._staging: Path | None = None
        self._rootfs: Path | None = None
        self._applied = 0
        self._overlay: OverlayRootfs | None = None
        self._held: HeldSnapshots | None = None
        self._overlay_ready = False

    # -- staging

    @property
    def staging(self) -> Path:
        if self._staging is None:
            root = staging_root()
            root.mkdir(parents=True, exist_ok=True)
            self._staging = (
                root / f"{_STAGING_PREFIX}{os.getpid()}-{self.name}-{uuid.uuid4().hex[:8]}"
            )
            self._staging.mkdir(mode=0o700)
        return self._staging

    def cleanup(self) -> None:
        """Unmount, release and remove what this image's bake made; also after Ctrl-C.

        A staging dir that still has a mount on it is never removed (that would
        reach through the mount); the next bake unmounts and removes it."""
        from kiln.image.overlay import unmount_all_under

        unmounted = self._overlay is None or self._overlay.unmount()
        if self._staging is not None:
            unmounted = unmount_all_under(self._staging) and unmounted
        if self._held is not None and unmounted:
            self._held.release()
            self._held = None
        if self._staging is not None and unmounted:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def rootfs(self, ids: IdRange) -> Path:
        """The filesystem so far, owners shifted into ``ids``, made on the first run
        step that misses the cache.

        An overlay of the layers' snapshots when overlayfs is usable (see
        :mod:`kiln.image.overlay`), else unpacked into staging. Layers added
        after that are applied with the one safe extractor.
        """
        if self._rootfs is None:
            self._rootfs = self._mount_snapshots()
        if self._rootfs is None:
            self._rootfs = self.staging / "rootfs"
            self._rootfs.mkdir(mode=0o755)
            os.chown(self._rootfs, ids.to_host(0), ids.to_host(0))
        from kiln.image.unpack import apply_stored_layer

        for layer in self.layers[self._applied :]:
            apply_stored_layer(
                self.shared.store,
                layer.descriptor,
                self._rootfs,
                source=layer.source,
                diff_id=layer.diff_id,
                ids=ids,
            )
            self._applied += 1
        if self._overlay is not None and not self._overlay_ready:
            self._overlay.copy_up_directories()
            self._overlay_ready = True
        return self._rootfs

    def _mount_snapshots(self) -> Path | None:
        """An overlay over the snapshots of every layer so far, unpacking those missing.

        They stay held (gc keeps them) until the bake unmounts.
        """
        from kiln.image import overlay

        snapshots = self.shared.snapshots
        if snapshots is None or self._applied or not self.layers:
            return None
        if not overlay.overlay_usable(staging_root()):
            return None
        held = snapshots.hold(self.shared.store, self.layers)
        rootfs = overlay.OverlayRootfs(held.paths, self.staging)
        if not overlay.options_fit(held.paths, rootfs.upper, rootfs.work):
            held.release()
            return None
        self._held = held
        self._overlay = rootfs
        merged = rootfs.mount()
        self._applied = len(self.layers)
        return merged

    # -- run

    def run(self) -> BakeResult:
        started = time.monotonic()
        progress = self.shared.progress
        progress.image_started(self.name, len(self.recipe.steps))
        try:
            self._base()
            self.env.update(self.recipe.env)
            for index, step in enumerate(self.recipe.steps, start=1):
                if self.shared.cancelled.is_set():
                    raise KilnError(f"{self.where}: bake cancelled")
                self._step(index, step)
            if self.shared.interrupted.is_set():
                raise Interrupted()  # nothing is tagged after Ctrl-C
            result = self._assemble(started)
        except BaseException as e:
            interrupted = self.shared.interrupted.is_set() or isinstance(e, KeyboardInterrupt)
            progress.image_failed(self.name, INTERRUPTED if interrupted else str(e))
            raise
        finally:
            self.cleanup()
        progress.image_finished(self.name, result.digest, result.seconds)
        return result

    def _record(
        self, index: int, label: str, cached: bool, started: float, size: int | None
    ) -> None:
        if cached:
            self.cached += 1
        else:
            self.built += 1
        self.shared.progress.step_finished(
            self.name, index, label, cached, time.monotonic() - started, size
        )

    def _add_layer(
        self,
        entry: CachedLayer,
        source: str,
        created_by: str,
        applied: bool,
        *,
        created: int | None = None,
    ) -> None:
        when = rfc3339(self.shared.epoch if created is None else created)
        if entry.descriptor is None or entry.diff_id is None:
            self.history.append({"created": when, "created_by": created_by, "empty_layer": True})
            return
        self.layers.append(BaseLayer(entry.descriptor, entry.diff_id, source))
        if applied:
            self._applied = len(self.layers)
        self.history.append({"created": when, "created_by": created_by})

    # -- base

    def _base(self) -> None:
        source = self.recipe.from_
        kind = base_kind(source)
        label = f"from {source}"
        started = time.monotonic()
        self.shared.progress.step_started(self.name, 0, label)
        where = f"{self.file}: {self.where}.from"
        base: BaseImage
        if kind == "scratch":
            base = SCRATCH
        elif kind == "image":
            dependency = source.removeprefix("image:")
            result = self.shared.results.get(dependency)
            if result is None:
                raise KilnError(f"{where}: {source} has not been baked")
            base = kiln_image_base(self.shared.store, source, result.digest)
        elif kind == "oci":
            try:
                base = oci_layout_base(self.shared.store, source, self.shared.spec.root)
            except KilnError as e:
                raise KilnError(f"{where}: {e}") from e
        elif kind == "registry":
            base = self._registry(source, where)
        elif kind == "debian":
            from kiln.image.sandbox import DEFAULT_PATH

            self._adopt(BaseImage(source, (), {"Env": [f"PATH={DEFAULT_PATH}"]}))
            for layer, created_by in self._debian(source, started):
                digest = layer.descriptor.digest if layer.descriptor else "-"
                self._add_layer(
                    layer, f"{source}: layer {digest}", created_by, False, created=base_epoch()
                )
            return
        else:
            raise KilnError(
                f"{where}: base {source!r} is not supported: "
                "use scratch, debian:SUITE, image:NAME, oci:PATH[:REF] "
                "or registry:HOST/REPO[:TAG|@sha256:…]"
            )
        self._adopt(base)
        size = sum(layer.size for layer in base.layers) if base.layers else None
        self.shared.progress.step_finished(
            self.name, 0, label, True, time.monotonic() - started, size
        )

    def _adopt(self, base: BaseImage) -> None:
        self.layers = list(base.layers)
        self.inherited = dict(base.config)
        self.env = _env_list_to_dict(self.inherited.get("Env"))
        self.workdir = str(self.inherited.get("WorkingDir") or "/")
        history = list(base.history)
        non_empty = [h for h in history if not h.get("empty_layer")]
        if len(non_empty) != len(base.layers):
            history = [
                {"created": rfc3339(0), "created_by": f"{base.label} layer {i}"}
                for i in range(1, len(base.layers) + 1)
            ]
        self.history = history

    def _registry(self, source: str, where: str) -> BaseImage:
        """A registry base at the digest ``kiln.lock`` pins its tag to; a tag without a pin
        (or ``--update-lock``) is resolved now, and pinned once the base is pulled."""
        from kiln.image import debian
        from kiln.image.registry import options_for, parse_ref, resolve

        shared = self.shared
        try:
            ref = parse_ref(source)
        except KilnError as e:
            raise KilnError(f"{where}: {e}") from e
        options = options_for(shared.spec, ref.host)
        lock_path = shared.spec.root / debian.LOCK_NAME
        key = registry_pin_key(source)
        digest = ref.digest
        try:
            if key is not None and not shared.update_lock:
                with shared.lock:
                    digest = debian.read_registry_pins(lock_path).get(key)
            if digest is None:
                digest = resolve(source, options)
            base = registry_base(shared.store, source, digest, options)
        except KilnError as e:
            raise KilnError(f"{where}: {e}") from e
        if key is not None:
            with shared.lock:
                pins = debian.read_registry_pins(lock_path)
                if pins.get(key) != digest:
                    pins[key] = digest
                    live = _registry_pin_keys(shared.spec)
                    debian.write_lock(
                        lock_path,
                        debian.read_lock(lock_path),
                        {k: v for k, v in pins.items() if k in live},
                    )
        return base

    def _debian(self, source: str, started: float) -> list[tuple[CachedLayer, str]]:
        """The base's layers: the machine's shared minimal tree, then the recipe's
        packages over it (:mod:`kiln.image.debian_layers`); ``kiln.lock`` written when
        this bake resolved it."""
        from kiln.image import debian, overlay
        from kiln.image.debian_layers import DebianRequest, debian_layers

        where = f"{self.file}: {self.where}"
        shared = self.shared
        base = debian.parse_debian_base(source, self.recipe.packages, where)
        lock_path = shared.spec.root / debian.LOCK_NAME
        with shared.lock:
            entries = debian.read_lock(lock_path)
        entry = None if shared.update_lock else entries.get(base.lock_key)
        progress = shared.progress
        request = DebianRequest(
            image=self.name,
            where=where,
            base=base,
            entry=entry,
            epoch=base_epoch(),
            store=shared.store,
            cache=shared.cache,
            deb_cache=download_cache() / "debs",
            apt_state=download_cache() / "apt" / f"{base.suite}-{base.architecture}",
            staging=lambda: self.staging,
            log=bake_log(self.name),
            event=lambda text: progress.step_output(self.name, 0, text),
            status=lambda text: progress.step_status(self.name, 0, text),
            interrupted=shared.interrupted,
            no_cache=shared.no_cache,
            update_lock=shared.update_lock,
            fresh_bases=shared.fresh_bases,
            snapshots=shared.snapshots,
            overlay_usable=lambda: overlay.overlay_usable(staging_root()),
        )
        result = debian_layers(request)
        if result.lock_entry is not None:
            with shared.lock:
                entries = debian.read_lock(lock_path)
                entries[base.lock_key] = result.lock_entry
                live = _lock_keys(shared.spec, base.architecture)
                debian.write_lock(lock_path, {k: v for k, v in entries.items() if k in live})
        size = sum(layer.descriptor.size for layer, _ in result.layers if layer.descriptor)
        self._record(0, f"from {source}", not result.built, started, size)
        return result.layers

    # -- steps

    def _step(self, index: int, step: Any) -> None:
        kind = _step_kind(step)
        label = _step_label(step)
        self.shared.progress.step_started(self.name, index, label)
        started = time.monotonic()
        if kind == "env":
            self.env.update(step.env)
            self.history.append(
                {"created": rfc3339(self.shared.epoch), "created_by": label, "empty_layer": True}
            )
            self.shared.progress.step_finished(self.name, index, label, True, 0.0, None)
        elif kind == "workdir":
            self.workdir = step.workdir
            self.history.append(
                {"created": rfc3339(self.shared.epoch), "created_by": label, "empty_layer": True}
            )
            self.shared.progress.step_finished(self.name, index, label, True, 0.0, None)
        elif kind == "copy":
            self._copy(index, step, label, started)
        else:
            self._run(index, step, label, started)

    def _lookup(self, key: str) -> CachedLayer | None:
        if self.shared.no_cache:
            return None
        return self.shared.cache.get(key, self.shared.store)

    def _parents(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    def _copy(self, index: int, step: CopyStep, label: str, started: float) -> None:
        where = f"{self.file}: {self.where}.steps[{index - 1}].copy"
        root = self.shared.spec.root.resolve()
        source = (self.shared.spec.root / step.copy_).absolute()
        if not os.path.lexists(source):
            raise KilnError(f"{where}: {step.copy_} does not exist")
        resolved = source.resolve()
        if not resolved.is_relative_to(root):
            raise KilnError(f"{where}: {step.copy_} is outside the project directory {root}")
        dest = step.to
        if not resolved.is_dir() and step.to.endswith("/"):
            dest = step.to + resolved.name
        inputs = copy_inputs(resolved, self.shared.files, where)
        key = step_key(
            self._parents(),
            {
                "copy": inputs,
                "to": dest,
                "chmod": step.chmod,
                "epoch": self.shared.epoch,
            },
        )
        hit = self._lookup(key)
        if hit is not None:
            self._add_layer(hit, label, label, applied=False)
            size = hit.descriptor.size if hit.descriptor else None
            self._record(index, label, True, started, size)
            return
        from kiln.image.layer import layer_from_dir

        staged = self.staging / f"copy-{index}"
        stage_copy(resolved, staged, self.shared.epoch, step.chmod)
        result = layer_from_dir(
            staged,
            self.shared.store,
            self.shared.epoch,
            normalize_modes=step.chmod is None,
            root_owned=True,
            prefix=dest,
            cancelled=self.shared.interrupted,
        )
        shutil.rmtree(staged, ignore_errors=True)
        entry = CachedLayer(result.descriptor, result.diff_id, result.size_uncompressed)
        self.shared.cache.put(key, entry)
        self._add_layer(entry, f"{where}: layer {result.descriptor.digest}", label, applied=False)
        self._record(index, label, False, started, result.descriptor.size)

    def _run(self, index: int, step: RunStep, label: str, started: float) -> None:
        from kiln.image import sandbox

        env = sandbox.sandbox_env(self.env)
        key = step_key(
            self._parents(),
            {
                "run": step.run,
                "network": step.network,
                "env": env,
                "workdir": self.workdir,
                "epoch": self.shared.epoch,
            },
        )
        hit = self._lookup(key)
        if hit is not None:
            self._add_layer(hit, label, label, applied=False)
            self._record(
                index, label, True, started, hit.descriptor.size if hit.descriptor else None
            )
            return
        ids = self.shared.ids
        if ids is None:
            line = self.shared.spec.line("images", self.name, "steps", index - 1)
            at = f"{self.file}:{line}" if line else self.file
            blocker = sandbox.step_blocker() or sandbox.STEPS_NEED
            raise KilnError(f"{at}: {self.where}.steps[{index - 1}].run: {blocker}")
        from kiln.image.layer import layer_from_diff, snapshot

        rootfs = self.rootfs(ids)
        if self.shared.interrupted.is_set():
            raise Interrupted()
        before = snapshot(rootfs, ids)
        make_workdir(rootfs, self.workdir, ids, f"{self.where} step {index} (run)")
        outcome = sandbox.run_in_sandbox(
            rootfs,
            sandbox.step_command(step.run),
            env,
            self.workdir,
            step.network,
            lambda line: self.shared.progress.step_output(self.name, index, line),
            ids=ids,
        )
        if outcome.exit_code != 0:
            from kiln.image.hints import step_hints

            hints = step_hints(outcome.exit_code, outcome.tail, step.network)
            tail = "\n".join([*outcome.tail, *(f"hint: {h}" for h in hints)])
            raise KilnError(f"{self.where} step {index} (run): exit {outcome.exit_code}\n{tail}")
        after = snapshot(rootfs, ids)
        if self._overlay is not None:
            after = self._overlay.settle(before, after)
        result = layer_from_diff(
            rootfs,
            before,
            after,
            self.shared.store,
            self.shared.epoch,
            cancelled=self.shared.interrupted,
        )
        if result is None:
            entry = CachedLayer(None, None, 0)
            source = label
        else:
            entry = CachedLayer(result.descriptor, result.diff_id, result.size_uncompressed)
            source = f"{self.where} step {index}: layer {result.descriptor.digest}"
        self.shared.cache.put(key, entry)
        self._add_layer(entry, source, label, applied=True)
        self._record(
            index, label, False, started, entry.descriptor.size if entry.descriptor else None
        )

    # -- assembly

    def _config(self) -> dict[str, Any]:
        recipe = self.recipe
        inherited = self.inherited
        config: dict[str, Any] = {
            key: inherited[key]
            for key in (
                "Cmd",
                "Entrypoint",
                "User",
                "WorkingDir",
                "ExposedPorts",
                "Labels",
                "Healthcheck",
                "StopSignal",
            )
            if inherited.get(key)
        }
        config["Env"] = [f"{k}={v}" for k, v in self.env.items()]
        if recipe.entrypoint is not None:
            config["Entrypoint"] = list(recipe.entrypoint)
            if recipe.cmd is None:
                config.pop("Cmd", None)
        if recipe.cmd is not None:
            config["Cmd"] = list(recipe.cmd)
        if recipe.user is not None:
            config["User"] = recipe.user
        workdir = recipe.workdir or (self.workdir if self.workdir != "/" else None)
        if workdir:
            config["WorkingDir"] = workdir
        if recipe.expose:
            ports = dict(config.get("ExposedPorts") or {})
            for port in recipe.expose:
                text = str(port)
                ports[text if "/" in text else f"{text}/tcp"] = {}
            config["ExposedPorts"] = ports
        labels = dict(config.get("Labels") or {})
        labels.update(recipe.labels)
        check = recipe.healthcheck
        if check is not None:
            labels[HEALTHCHECK_LABEL] = canonical_json(check.model_dump(exclude_none=True)).decode()
            if check.exec:
                config["Healthcheck"] = {
                    "Test": ["CMD", *check.exec],
                    "Interval": int(check.interval * 1e9),
                    "Timeout": int(check.timeout * 1e9),
                }
        if labels:
            config["Labels"] = labels
        return config

    def _evidence(self, digest: str) -> None:
        """The image's SBOM as a referrer, before it is tagged (a failure tags nothing);
        a cached re-bake finds it already attached and does nothing."""
        from kiln.supply.sbom import ensure_sbom

        try:
            ensure_sbom(self.shared.store, digest)
        except KilnError as e:
            raise KilnError(f"{self.file}: {self.where}: SBOM: {e}") from e

    def _provenance(self, digest: str, started: float) -> None:
        """Unsigned SLSA provenance as a referrer, before tagging; a cached re-bake finds it
        attached and gathers nothing (:mod:`kiln.supply.provenance`)."""
        from kiln.supply.provenance import BakeFacts, base_layers, ensure_provenance

        shared = self.shared
        wall_start = time.time() - (time.monotonic() - started)

        def facts() -> BakeFacts:
            from kiln.image import debian

            source = self.recipe.from_
            base_digest: str | None = None
            if base_kind(source) == "image":
                done = shared.results.get(source.removeprefix("image:"))
                base_digest = done.digest if done else None
            elif base_kind(source) == "registry":
                key = registry_pin_key(source)
                pins = debian.read_registry_pins(shared.spec.root / debian.LOCK_NAME)
                base_digest = pins.get(key) if key else source.rpartition("@")[2]
            return BakeFacts(
                image=self.name,
                recipe=self.recipe.model_dump(mode="json", by_alias=True, exclude_none=True),
                environment=shared.spec.environment,
                base=source,
                base_digest=base_digest,
                base_layers=base_layers(source, [(b.source, b.descriptor) for b in self.layers]),
                lock_file=shared.spec.root / debian.LOCK_NAME,
                commit=shared.facts.commit,
                clean=shared.facts.clean,
                remote=shared.facts.remote,
                epoch=shared.epoch,
                started=wall_start,
            )

        try:
            ensure_provenance(shared.store, digest, facts)
        except KilnError as e:
            raise KilnError(f"{self.file}: {self.where}: provenance: {e}") from e

    def _secret_scan(self, digest: str) -> None:
        """Fail on a secret in the layers the recipe's own steps made (each step appends
        one history entry; the base's layers are not the recipe's); the clean result is a
        referrer for the policy gate (:mod:`kiln.supply.secrets_scan`)."""
        from kiln.supply.secrets_scan import AllowEntry, ensure_secret_scan

        steps = self.history[len(self.history) - len(self.recipe.steps) :]
        made = sum(1 for entry in steps if not entry.get("empty_layer"))
        layers = [layer.descriptor for layer in self.layers[len(self.layers) - made :]]
        allow = [AllowEntry(a.path, a.rule, a.reason) for a in self.recipe.secrets_allow]
        where = f"{self.file}: {self.where}"
        try:
            result = ensure_secret_scan(self.shared.store, digest, layers, allow, where)
        except KilnError as e:
            message = str(e)
            raise KilnError(message if message.startswith(where) else f"{where}: {e}") from e
        for entry in result.stale if result is not None else []:
            self.shared.progress.step_output(
                self.name,
                len(self.recipe.steps),
                f"warning: {where}.secrets_allow: {entry.path} ({entry.rule or 'any rule'}) "
                "matches nothing; remove it",
            )

    def _assemble(self, started: float) -> BakeResult:
        shared = self.shared
        store = shared.store
        image_config = {
            "architecture": oci_architecture(),
            "os": "linux",
            "created": rfc3339(shared.epoch),
            "config": self._config(),
            "rootfs": {"type": "layers", "diff_ids": self._parents()},
            "history": self.history,
        }
        config_desc = store.put_bytes(canonical_json(image_config), MEDIA_TYPE_CONFIG)
        annotations = {
            ANNOTATION_CREATED: rfc3339(shared.epoch),
            ANNOTATION_TITLE: self.name,
        }
        if shared.facts.commit:
            annotations[ANNOTATION_REVISION] = shared.facts.commit
        if shared.facts.remote:
            annotations[ANNOTATION_SOURCE] = shared.facts.remote
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.descriptor.to_json() for layer in self.layers],
            "annotations": annotations,
        }
        manifest_desc = store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
        self._secret_scan(manifest_desc.digest)
        self._evidence(manifest_desc.digest)
        self._provenance(manifest_desc.digest, started)
        refs = [f"{self.name}:{manifest_desc.digest.removeprefix('sha256:')[:12]}"]
        if self.recipe.tag:
            refs.append(f"{self.name}:{self.recipe.tag}")
        tagged = Descriptor(manifest_desc.media_type, manifest_desc.digest, manifest_desc.size)
        for ref in refs:
            try:
                store.tag(ref, tagged)
            except KilnError as e:
                raise KilnError(f"{self.file}: {self.where}.tag: {e}") from e
        return BakeResult(
            self.name,
            manifest_desc.digest,
            tuple(refs),
            self.built,
            self.cached,
            time.monotonic() - started,
        )


def _lock_keys(spec: Spec, architecture: str) -> set[str]:
    """The lock tables some recipe still asks for; the others are dropped on the next write."""
    from kiln.image import debian

    keys: set[str] = set()
    for name, recipe in spec.images.items():
        if base_kind(recipe.from_) == "debian":
            with contextlib.suppress(KilnError):
                where = f"images.{name}"
                keys.add(
                    debian.parse_debian_base(
                        recipe.from_, recipe.packages, where, architecture
                    ).lock_key
                )
    return keys


def _registry_pin_keys(spec: Spec) -> set[str]:
    """The registry pins some recipe still asks for; the others are dropped on the next write."""
    keys: set[str] = set()
    for recipe in spec.images.values():
        if base_kind(recipe.from_) == "registry":
            with contextlib.suppress(KilnError):
                key = registry_pin_key(recipe.from_)
                if key is not None:
                    keys.add(key)
    return keys


def copy_inputs(source: Path, files: FileHashCache, where: str) -> list[list[Any]]:
    """Every entry a copy step reads, as [path, kind, mode, content]: the copy's cache input."""
    top = source.lstat()
    if not stat.S_ISDIR(top.st_mode):
        return [_input_entry(".", source, top, files, where)]
    out: list[list[Any]] = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(source).as_posix()
            out.append(_input_entry(rel, path, path.lstat(), files, where))
    out.sort(key=lambda entry: str(entry[0]).encode("utf-8", "surrogateescape"))
    return out


def _input_entry(
    rel: str, path: Path, st: os.stat_result, files: FileHashCache, where: str
) -> list[Any]:
    if stat.S_ISLNK(st.st_mode):
        return [rel, "link", 0o777, os.readlink(path)]
    if stat.S_ISDIR(st.st_mode):
        return [rel, "dir", normalized_mode(st), None]
    if stat.S_ISREG(st.st_mode):
        return [rel, "file", normalized_mode(st), files.sha256(path, st)]
    raise KilnError(f"{where}: {path} is not a file, directory or symlink")


def make_workdir(rootfs: Path, workdir: str, ids: IdRange | None, where: str) -> None:
    """Create a step's missing working directory, root's and 0755, inside ``rootfs``.

    Symlinks on the way are followed as the sandbox will follow them: inside
    the rootfs (an absolute target is rootfs-relative, ``..`` stops at its
    root), never on the host.
    """
    pending = [part for part in workdir.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        path = rootfs.joinpath(*resolved, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            if ids is not None:
                os.chown(path, ids.to_host(0), ids.to_host(0))
            os.chmod(path, 0o755)
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise KilnError(f"{where}: workdir {workdir}: too many symlinks")
            target = os.readlink(path)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
        elif stat.S_ISDIR(st.st_mode):
            resolved.append(part)
        else:
            raise KilnError(
                f"{where}: workdir {workdir}: /{'/'.join([*resolved, part])} is not a directory"
            )


def stage_copy(source: Path, staged: Path, epoch: int, chmod: str | None) -> None:
    """A private copy whose modes and times depend only on the recipe and the epoch."""
    forced = int(chmod, 8) if chmod else None
    if source.is_dir():
        shutil.copytree(source, staged, symlinks=True, copy_function=shutil.copyfile)
    elif source.is_symlink():
        os.symlink(os.readlink(source), staged)
    else:
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staged)
        os.chmod(staged, forced if forced is not None else normalized_mode(source.stat()))
    if source.is_dir() and not source.is_symlink():
        for dirpath, dirnames, filenames in os.walk(staged, topdown=False):
            for name in filenames + dirnames:
                path = Path(dirpath) / name
                original = source / path.relative_to(staged)
                st = original.lstat()
                if not stat.S_ISLNK(st.st_mode):
                    os.chmod(path, forced if forced is not None else normalized_mode(st))
                os.utime(path, (epoch, epoch), follow_symlinks=False)
        os.chmod(staged, forced if forced is not None else 0o755)
    os.utime(staged, (epoch, epoch), follow_symlinks=False)


# -- entry points -----------------------------------------------------------


def bake(
    spec: Spec,
    names: Sequence[str] | None = None,
    *,
    no_cache: bool = False,
    update_lock: bool = False,
    store: ImageStore | None = None,
    progress: BakeProgress | None = None,
) -> dict[str, BakeResult]:
    """Bake ``names`` (default: every recipe) and the images they are based on.

    Images that do not depend on each other bake in parallel threads. Returns
    the results in bake order. Raises KilnError for the first failure, after
    the other running bakes finished; nothing of a failed image is tagged.
    Ctrl-C in the main thread stops every image at once; KeyboardInterrupt is
    re-raised once everything they started is stopped and cleaned up.
    """
    from kiln.image.debian_layers import DEBIAN_TMP_PREFIX
    from kiln.image.snapshots import SnapshotStore, remove_legacy_trees

    order = bake_order(spec, names)
    home = kiln_home()
    store = store or ImageStore(home / "images")
    ids = step_ids(home)
    snapshots = SnapshotStore(home, ids) if ids is not None else None
    clean_stale_staging(staging_root())
    clean_stale_staging(Path(tempfile.gettempdir()), DEBIAN_TMP_PREFIX)
    remove_legacy_trees(home, ("cache/trees",))
    if snapshots is not None:
        snapshots.sweep_staging()
    facts = git_facts(spec.root)
    shared = _Shared(
        spec=spec,
        store=store,
        cache=LayerCache(home / "cache" / "layers"),
        files=FileHashCache(home / "cache" / "files", spec.root.resolve()),
        progress=progress or SilentProgress(),
        no_cache=no_cache,
        update_lock=update_lock,
        epoch=source_date_epoch(spec.root, facts),
        facts=facts,
        ids=ids,
        snapshots=snapshots,
    )
    try:
        _run_in_order(shared, order)
    finally:
        shared.files.save()
    return {name: shared.results[name] for name in order}


def _run_in_order(shared: _Shared, order: list[str]) -> None:
    spec = shared.spec
    needs = {name: image_dependency(spec.images[name].from_) for name in order}
    pending = list(order)
    running: dict[Future[BakeResult], str] = {}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(order) or 1)) as pool:
        try:
            while pending or running:
                if failure is None:
                    for name in list(pending):
                        dependency = needs[name]
                        if dependency is None or dependency in shared.results:
                            pending.remove(name)
                            job = _ImageBake(shared, name, spec.images[name])
                            running[pool.submit(job.run)] = name
                elif not running:
                    break
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    try:
                        shared.results[name] = future.result()
                    except BaseException as e:
                        if failure is None:
                            failure = e
                            shared.cancelled.set()
        except KeyboardInterrupt:
            _stop_everything(shared, running)
            raise
        except BaseException:
            shared.cancelled.set()
            raise
    if failure is not None:
        raise failure


def _stop_everything(shared: _Shared, running: Mapping[Future[BakeResult], str]) -> None:
    """Ctrl-C: every image stops where it is and cleans up before the bake exits.

    Build commands and layer writing watch ``interrupted``; a ``run`` step's
    launcher is sent the SIGINT a terminal sends its whole process group (a
    ``kill -INT`` reaches only Kiln). Further Ctrl-Cs do not cut the cleanup
    short.
    """
    shared.interrupted.set()
    shared.cancelled.set()
    while True:
        _interrupt_step_launchers()
        try:
            wait(running)
            return
        except KeyboardInterrupt:
            continue


def _interrupt_step_launchers() -> None:
    """SIGINT to this process's children that launch ``run`` steps (kiln.oci.launch):
    each stops its container and exits, as on a terminal's Ctrl-C."""
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_text = (entry / "stat").read_text()
            ppid = int(stat_text[stat_text.rindex(")") + 2 :].split()[1])
            if ppid != own or b"kiln.oci.launch" not in (entry / "cmdline").read_bytes():
                continue
            os.kill(int(entry.name), signal.SIGINT)
        except (OSError, ValueError, IndexError):
            continue


def collect_garbage(store: ImageStore) -> GcResult:
    """``kiln image gc``: keep what a tag or the layer cache needs.

    Then the layer snapshots go that no image left in the store uses (a
    snapshot a running bake has mounted stays), and what Kiln kept before
    snapshots (``rootfs/``, ``cache/trees/``); ``freed_bytes`` counts them too.
    """
    from kiln.image.snapshots import SnapshotStore, image_chains, remove_legacy_trees

    home = kiln_home()
    cache = LayerCache(home / "cache" / "layers")
    result = store.gc(keep=cache.digests())
    freed = SnapshotStore(home).remove_unreferenced(image_chains(store))
    freed += remove_legacy_trees(home)
    return GcResult(result.removed_blobs, result.freed_bytes + freed)


@contextlib.contextmanager
def _display() -> Iterator[BakeProgress]:
    if sys.stderr.isatty():
        from kiln.image.progress import LiveProgress

        with LiveProgress() as live:
            yield live
    else:
        from kiln.image.progress import PlainProgress

        yield PlainProgress()


def bake_project(
    path: Path,
    names: Sequence[str] | None,
    *,
    no_cache: bool = False,
    update_lock: bool = False,
    env: str | None = None,
) -> dict[str, BakeResult]:
    """The CLI's ``kiln bake``: load the spec, bake with a display fit for stderr."""
    from kiln.spec import load_spec

    spec = load_spec(path, env)
    # On Ctrl-C everything the bake started is stopped and cleaned up before the
    # KeyboardInterrupt leaves; the CLI says "interrupted" and exits 130.
    with _display() as progress:
        return bake(spec, names, no_cache=no_cache, update_lock=update_lock, progress=progress)
