"""Image trees and clean-up for real local-runtime sandboxes.

Layer snapshots come to the runtime with ownership already shifted into the
home's id range (``kiln.oci.idmap``). A tree owned by host root still runs
(inside the user namespace it shows as nobody/nogroup, 65534); a tree shifted
with :func:`shift_tree` shows root-owned files as uid 0, as a real image does.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import busybox_tree
from busybox_tree import MOUNT_POINTS
from kiln.observe.logs import LogLine, LogStore
from kiln.oci.idmap import id_range
from kiln.runtime import InstanceSpec, InstanceStatus
from kiln.runtime.local import LocalRuntime

__all__ = [
    "build_image_tree",
    "image_spec_factory",
    "logs_of",
    "run_to_exit",
    "shift_tree",
    "shifted_image_tree",
    "stdout_of",
    "tear_down",
    "tree_listing",
]

WWW = {"index.html": "hello from kiln\n"}


def build_image_tree(dest: Path, mount_points: bool = True) -> Path:
    """A minimal image root: static busybox with every applet in /bin, /www/index.html."""
    return busybox_tree.build_busybox_rootfs(
        dest,
        www=WWW,
        mount_points=(*MOUNT_POINTS, "data", "cache") if mount_points else (),
    )


def shift_tree(tree: Path, home: Path) -> Path:
    """Owners into the home's id range, as the layer unpacker leaves a snapshot."""
    from kiln.image.snapshots import shift_tree as shift

    shift(tree, id_range(home), str(tree))
    return tree


def shifted_image_tree(dest: Path, home: Path, mount_points: bool = True) -> Path:
    """An image tree whose ownership is mapped into ``home``'s id range."""
    return shift_tree(build_image_tree(dest, mount_points), home)


def tree_listing(tree: Path) -> list[tuple[str, int, int, int, int, float]]:
    """Every entry with its mode, owner, size and mtime: proof that nothing wrote into it."""
    found = []
    for directory, dirs, files in os.walk(tree):
        for name in sorted([*dirs, *files]):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            found.append(
                (
                    os.path.relpath(path, tree),
                    st.st_mode,
                    st.st_uid,
                    st.st_gid,
                    st.st_size,
                    st.st_mtime,
                )
            )
    return sorted(found)


def tear_down(runtime: LocalRuntime) -> None:
    """Stop and release every instance of the home, then free the machine-wide resources."""
    if runtime.instances_dir.is_dir():
        for directory in sorted(runtime.instances_dir.iterdir()):
            handle = runtime.handle_for(directory.name)
            if handle is not None and runtime.recover(handle):
                runtime.stop(handle, grace=0)
                runtime.destroy(handle)
            else:
                runtime.release(directory.name)
    runtime.shutdown()


def run_to_exit(
    runtime: LocalRuntime, spec: InstanceSpec, timeout: float = 10
) -> tuple[int | None, list[LogLine]]:
    handle = runtime.start(spec)
    state = runtime.wait(handle, timeout)
    assert state.status is InstanceStatus.EXITED, state
    return state.exit_code, logs_of(runtime, spec)


def logs_of(runtime: LocalRuntime, spec: InstanceSpec) -> list[LogLine]:
    return list(LogStore(runtime.logs_dir).read(spec.service, spec.instance_id))


def stdout_of(runtime: LocalRuntime, spec: InstanceSpec) -> list[str]:
    code, lines = run_to_exit(runtime, spec)
    assert code == 0, [(line.stream, line.line) for line in lines]
    return [line.line for line in lines if line.stream == "stdout"]


_instance_numbers = itertools.count(1)


def image_spec_factory(
    image_digest: str, service: str, revision: int, port: int
) -> Callable[..., InstanceSpec]:
    """Specs of a stored image for an engine runtime (Docker, Swarm): a command and
    overrides give an instance of ``service`` with an id of its own."""

    def make(command: list[str], **overrides: Any) -> InstanceSpec:
        fields: dict[str, Any] = {
            "instance_id": f"{service}-{os.getpid():x}{next(_instance_numbers):03d}",
            "service": service,
            "revision": revision,
            "image_digest": image_digest,
            "command": command,
            "user": None,
            "workdir": "/",
            "env": {"PATH": "/bin", "PORT": str(port)},
            "port": port,
            "stop_grace": 2.0,
        }
        fields.update(overrides)
        return InstanceSpec(**fields)

    return make
