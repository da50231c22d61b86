"""The embedded runtime: each instance is a runc container on this machine.

Per instance, ``KILN_HOME/instances/<id>/`` holds ``spec.json`` (the launch
plan for the shim; no secret values), ``bundle/config.json`` (the OCI runtime
config), ``handle.json`` (written by the shim), ``exit.json`` (written by the
shim when the container exits), ``runc.log`` and ``shim.log``. The root and
the secret files are mounted under ``/run/kiln/<tag>/instances/<id>`` in the
shim's private mount namespace only (see :mod:`kiln.runtime.shim`). Logs go
to ``KILN_HOME/logs`` and survive :meth:`LocalRuntime.destroy`.

Process tree: shim (subreaper) → container init (tini, pid 1 of the
instance's pid namespace; ``sandbox_pid``) → the app. Killing the init kills
everything inside; the shim records the exit, cleans up and leaves.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import dataclasses
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from signal import SIGKILL, SIGTERM
from typing import Any

from kiln.errors import KilnError
from kiln.oci.config import Mount, SandboxConfig, capability_name, runtime_config
from kiln.oci.idmap import id_range
from kiln.oci.network import host_resolv_conf
from kiln.oci.runc import RUN_ROOT, Runc, home_tag
from kiln.paths import open_private
from kiln.process import proc_start_time
from kiln.runtime import (
    HANDLE_VERSION,
    Capabilities,
    InstanceHandle,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    OutputTail,
    RuntimeFailure,
)
from kiln.runtime.shim import FORWARDED_SIGNALS, write_json_atomic

__all__ = ["INIT_BINARY", "LocalRuntime", "parse_user"]

START_TIMEOUT = 30.0
SHIM_EXIT_TIMEOUT = 5.0
SECRETS_TARGET = "/run/secrets"
INIT_TARGET = "/dev/init"
INIT_BINARY = Path("/usr/bin/tini-static")
DEFAULT_TMPFS_SIZE = 512 * 1024 * 1024


def parse_user(user: str | None) -> tuple[int, int]:
    """``"uid:gid"`` or ``"uid"`` (gid = uid) from the image config; None means root."""
    if not user:
        return 0, 0
    uid_text, _, gid_text = user.partition(":")
    try:
        uid = int(uid_text)
        gid = int(gid_text) if gid_text else uid
    except ValueError as e:
        raise RuntimeFailure(
            f"image user {user!r}: only numeric uid[:gid] is supported by the local runtime"
        ) from e
    return uid, gid


def _image_has_file(layers: tuple[Path, ...], relative: str) -> bool:
    """Whether the merged image holds a regular file there (the top layer that names it wins:
    an overlay whiteout is a character device). runc may then mount over it without
    creating anything in a directory the container's root may not write."""
    parts = Path(relative).parts
    for layer in reversed(layers):
        path = layer
        for part in parts:
            path = path / part
            if path.is_symlink():
                return False
        if os.path.lexists(path):
            return path.is_file()
    return False


def _check_name(instance_id: str, name: str, what: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > 128:
        raise RuntimeFailure(f"instance {instance_id}: invalid {what} {name!r}")


class LocalRuntime:
    """runc containers on this machine, each supervised by a detached shim.

    ``home`` is ``KILN_HOME``. The runtime holds no state of its own beyond
    the instance directories, so any number of ``LocalRuntime`` objects (in a
    restarted agent, a CLI, a test) see the same instances.
    """

    name = "local"

    def __init__(self, home: Path, *, python: str | None = None, network: bool = True) -> None:
        self.home = home.absolute()
        self.instances_dir = self.home / "instances"
        self.logs_dir = self.home / "logs"
        self.python = python or sys.executable
        self.runc = Runc(self.home)
        self.network = network
        self._legacy_checked = False
        self.capabilities = Capabilities(
            exec=True,
            signal=True,
            volumes=True,
            secrets=True,
            memory_limit=True,
            cpu_limit=True,
            pids_limit=True,
            user_namespace=True,
            raw_layers=True,
        )

    def close(self) -> None:
        """Nothing to release: the shims supervise the instances, not this object."""

    def image_layers(self, digest: str) -> tuple[Path, ...]:
        """Delivering an image here is unpacking the layer snapshots it lacks (an app edit
        costs its app layers only); the snapshots' flocks serialise concurrent starts."""
        from kiln.image.snapshots import SnapshotStore, remove_legacy_trees
        from kiln.image.store import ImageStore

        if not self._legacy_checked:
            remove_legacy_trees(self.home, ("rootfs",))  # whole unpacked images, before snapshots
            self._legacy_checked = True
        try:
            return SnapshotStore(self.home).layers_for(ImageStore(self.home / "images"), digest)
        except (OSError, KilnError) as e:
            raise RuntimeFailure(f"cannot unpack the layers of image {digest}: {e}") from e

    def volume_dir(self, name: str) -> Path:
        return self.home / "volumes" / name

    def _dir(self, instance_id: str) -> Path:
        return self.instances_dir / instance_id

    def view_dir(self, instance_id: str) -> Path:
        """Where the shim mounts the instance's root, in its own mount namespace only."""
        return RUN_ROOT / home_tag(self.home) / "instances" / instance_id

    def container_id(self, instance_id: str) -> str:
        return f"kiln-{home_tag(self.home)}-{instance_id}"

    def _check_handle(self, handle: InstanceHandle) -> None:
        if handle.runtime != self.name:
            raise RuntimeFailure(
                f"instance {handle.instance_id}: handle is for runtime {handle.runtime!r}, "
                f"not {self.name!r}"
            )

    def sandbox_config(self, spec: InstanceSpec, directory: Path) -> SandboxConfig:
        """The OCI side of one instance: what it may see, do and use."""
        ids = id_range(self.home)
        uid, gid = parse_user(spec.user)
        view = self.view_dir(spec.instance_id)
        tmpfs_size = f"size={spec.memory or DEFAULT_TMPFS_SIZE}"
        mounts = [
            Mount("/tmp", "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=1777", tmpfs_size)),
            Mount("/run", "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=755", tmpfs_size)),
        ]
        for path in spec.writable:
            mounts.append(
                Mount(path, "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=1777", tmpfs_size))
            )
        for index, volume in enumerate(spec.volumes):
            access = "ro" if volume.readonly else "rw"
            source = str(view / "volumes" / str(index))
            mounts.append(
                Mount(volume.target, "bind", source, ("rbind", access, "nosuid", "nodev"))
            )
        if spec.secrets:
            mounts.append(
                Mount(
                    SECRETS_TARGET,
                    "bind",
                    str(view / "secrets"),
                    ("rbind", "ro", "nosuid", "nodev", "noexec"),
                )
            )
        resolv = host_resolv_conf() if spec.outbound else None
        if resolv is not None and _image_has_file(spec.layers, "etc/resolv.conf"):
            mounts.append(
                Mount("/etc/resolv.conf", "bind", str(resolv), ("rbind", "ro", "nosuid", "nodev"))
            )
        args = list(spec.command)
        if INIT_BINARY.exists():
            mounts.append(
                Mount(INIT_TARGET, "bind", str(INIT_BINARY), ("bind", "ro", "nosuid", "nodev"))
            )
            args = [INIT_TARGET, "-g", "--", *args]
        try:
            caps = tuple(capability_name(c) for c in spec.cap_add)
        except KilnError as e:
            raise RuntimeFailure(f"instance {spec.instance_id}: {e}") from e
        return SandboxConfig(
            args=tuple(args),
            env=dict(spec.env),
            cwd=spec.workdir or "/",
            rootfs=view / "rootfs",
            ids=ids,
            hostname=spec.instance_id,
            cgroups_path=self.container_id(spec.instance_id),
            uid=uid,
            gid=gid,
            readonly_root=True,
            mounts=tuple(mounts),
            capabilities=caps,
            seccomp=spec.seccomp,
            memory=spec.memory,
            cpu=spec.cpu,
            pids=spec.pids,
            network_namespace=True,
        )

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        """Write the launch plan and OCI config, spawn the shim, return once it reports."""
        _check_name(spec.instance_id, spec.instance_id, "instance id")
        for name in spec.secrets:
            _check_name(spec.instance_id, name, "secret name")
        for volume in spec.volumes:
            _check_name(spec.instance_id, volume.name, "volume name")
        if not spec.layers:
            try:
                layers = self.image_layers(spec.image_digest)
            except RuntimeFailure as e:
                raise RuntimeFailure(f"instance {spec.instance_id}: {e}") from e
            spec = dataclasses.replace(spec, layers=layers)
        if not spec.layers:
            raise RuntimeFailure(f"instance {spec.instance_id}: no image layers")
        for layer in spec.layers:
            if not layer.is_dir():
                raise RuntimeFailure(f"instance {spec.instance_id}: image layer {layer} not found")
        directory = self._dir(spec.instance_id)
        ids = id_range(self.home)
        # Everything that can refuse the spec, before anything is written for it.
        try:
            uid, gid = parse_user(spec.user)
            config = runtime_config(self.sandbox_config(spec, directory))
        except KilnError as e:
            prefix = f"instance {spec.instance_id}: "
            raise RuntimeFailure(str(e) if str(e).startswith(prefix) else prefix + str(e)) from e
        self.instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError as e:
            raise RuntimeFailure(
                f"instance {spec.instance_id}: already exists in {self.instances_dir}"
            ) from e
        (directory / "bundle").mkdir(mode=0o700)
        try:
            for volume in spec.volumes:
                self._prepare_volume(
                    spec.instance_id,
                    self.volume_dir(volume.name),
                    ids.to_host(uid),
                    ids.to_host(gid),
                )
        except RuntimeFailure:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        write_json_atomic(directory / "bundle" / "config.json", config)
        plan = {
            "instance_id": spec.instance_id,
            "container_id": self.container_id(spec.instance_id),
            "home": str(self.home),
            "dir": str(directory),
            "runc": self.runc.binary,
            "view": str(self.view_dir(spec.instance_id)),
            "init": INIT_BINARY.exists(),
            "layers": [str(p) for p in spec.layers],
            "volumes": [str(self.volume_dir(v.name)) for v in spec.volumes],
            "ids": ids.to_json(),
            "user": [uid, gid],
            "workdir": spec.workdir,
            "env": spec.env,
            "port": spec.port,
            "stop_grace": spec.stop_grace,
            "network": {"outbound": spec.outbound} if self.network else None,
            "log_root": str(self.logs_dir),
            "meta": {
                "service": spec.service,
                "instance": spec.instance_id,
                "revision": spec.revision,
                "image_digest": spec.image_digest,
                "project": spec.project,
                "started": time.time(),
            },
        }
        write_json_atomic(directory / "spec.json", plan)
        secrets = json.dumps({k: base64.b64encode(v).decode() for k, v in spec.secrets.items()})
        held = self._hold_snapshots(spec)
        ready_r, ready_w = os.pipe()
        try:
            with os.fdopen(
                open_private(directory / "shim.log", os.O_WRONLY | os.O_APPEND), "ab"
            ) as shim_log:
                launcher = subprocess.Popen(
                    [
                        self.python, "-m", "kiln.runtime.shim", "--instance-dir", str(directory),
                        "--notify-fd", str(ready_w),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=shim_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(ready_w, *held),
                    env={k: v for k, v in os.environ.items() if k != "KILN_SECRET_KEY"},
                )  # fmt: skip
                launcher.communicate(secrets.encode())
        finally:
            # The shim keeps its own copies: the locks live as long as it does.
            for fd in (ready_w, *held):
                os.close(fd)
        try:
            select.select([ready_r], [], [], START_TIMEOUT)
        finally:
            os.close(ready_r)
        try:
            return self._await_handle(spec, directory)
        except RuntimeFailure:
            handle = self.handle_for(spec.instance_id)
            if handle is not None and self._shim_alive(handle):
                self.stop(handle, 0.0)
            self.release(spec.instance_id)
            raise

    def _hold_snapshots(self, spec: InstanceSpec) -> list[int]:
        """Shared locks on the image's layer snapshots, for the shim to hold while they are
        mounted: ``kiln image gc`` never removes a snapshot an instance runs from."""
        snapshots = self.home / "snapshots"
        if not all(layer.parent.parent == snapshots for layer in spec.layers):
            return []
        from kiln.image.snapshots import SnapshotStore

        try:
            held = SnapshotStore(self.home).hold_dirs(spec.layers)
        except KilnError as e:
            self.release(spec.instance_id)
            raise RuntimeFailure(f"instance {spec.instance_id}: {e}") from e
        fds = held.detach()
        return fds

    def _prepare_volume(self, instance_id: str, source: Path, uid: int, gid: int) -> None:
        """A new named volume belongs to the instance's user, inside the mapped range."""
        source.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            source.mkdir(mode=0o755)
        except FileExistsError:
            pass  # an older volume, or another instance starting at the same moment made it
        else:
            os.chown(source, uid, gid)
        if source.is_symlink():
            raise RuntimeFailure(f"instance {instance_id}: volume {source} is a symlink")
        if not source.is_dir():
            raise RuntimeFailure(f"instance {instance_id}: volume {source} is not a directory")

    def _await_handle(self, spec: InstanceSpec, directory: Path) -> InstanceHandle:
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.002
        while time.monotonic() < deadline:
            handle = self.handle_for(spec.instance_id)
            if handle is not None:
                return handle
            exit_record = _read_json(directory / "exit.json")
            if exit_record is not None:
                reason = exit_record.get("error") or f"exit {exit_record.get('exit_code')}"
                raise RuntimeFailure(f"instance {spec.instance_id}: {reason}")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        shim_log = (directory / "shim.log").read_text(errors="replace").strip().splitlines()
        detail = shim_log[-1] if shim_log else "no output"
        raise RuntimeFailure(
            f"instance {spec.instance_id}: shim did not report within {START_TIMEOUT:.0f}s "
            f"({detail}; see {directory / 'shim.log'})"
        )

    def _shim_alive(self, handle: InstanceHandle) -> bool:
        pid = _shim_pid(handle)
        return pid > 0 and proc_start_time(pid) == handle.data.get("shim_start_time")

    def inspect(self, handle: InstanceHandle) -> InstanceState:
        self._check_handle(handle)
        if self._shim_alive(handle):
            sandbox_pid = handle.data.get("sandbox_pid")
            return InstanceState(
                InstanceStatus.RUNNING, None, int(sandbox_pid or _shim_pid(handle))
            )
        record = _read_json(self._dir(handle.instance_id) / "exit.json")
        if record is not None:
            return InstanceState(
                InstanceStatus.EXITED,
                int(record["exit_code"]),
                None,
                oom_killed=bool(record.get("oom_killed")),
            )
        return InstanceState(InstanceStatus.GONE, None, None)

    def wait(self, handle: InstanceHandle, timeout: float) -> InstanceState:
        self._check_handle(handle)
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            pidfd = os.pidfd_open(_shim_pid(handle))
        except (ProcessLookupError, OSError):
            pidfd = -1
        try:
            # Check identity after opening the pidfd so a reused pid cannot slip in between.
            while self._shim_alive(handle):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if pidfd >= 0:
                    select.select([pidfd], [], [], remaining)
                    if proc_start_time(_shim_pid(handle)) is not None:
                        time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
                else:
                    time.sleep(min(0.05, remaining))
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return self.inspect(handle)

    def exit_fd(self, handle: InstanceHandle) -> int | None:
        """A pidfd of the shim, which outlives the app until it has recorded its exit."""
        self._check_handle(handle)
        try:
            fd = os.pidfd_open(_shim_pid(handle))
        except (ProcessLookupError, OSError, ValueError):
            return None
        # Identity checked after opening, so a reused pid cannot slip in between.
        if not self._shim_alive(handle):
            os.close(fd)
            return None
        return fd

    def signal(self, handle: InstanceHandle, sig: int) -> None:
        """Deliver ``sig`` to the app through the shim (which forwards it to the init)."""
        self._check_handle(handle)
        if sig not in FORWARDED_SIGNALS:
            raise RuntimeFailure(
                f"instance {handle.instance_id}: signal {sig} cannot be forwarded by the shim"
            )
        if self._shim_alive(handle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(_shim_pid(handle), sig)

    def _sandbox_pid(self, handle: InstanceHandle) -> int | None:
        """The container's init, if it is still the process the handle names."""
        pid = handle.data.get("sandbox_pid")
        if pid and proc_start_time(int(pid)) == handle.data.get("sandbox_start_time"):
            return int(pid)
        return None

    def freeze(self, handle: InstanceHandle) -> None:
        """The cgroup freezer of the container (``freezer.state`` on cgroup v1,
        ``cgroup.freeze`` on v2): every process stops where it stands."""
        from kiln.runtime.procfacts import freeze_cgroup, freezer_dir

        self._check_handle(handle)
        pid = self._sandbox_pid(handle)
        if pid is None:
            raise RuntimeFailure(f"instance {handle.instance_id}: not running, cannot freeze")
        try:
            freeze_cgroup(*freezer_dir(pid))
        except OSError as e:
            raise RuntimeFailure(f"instance {handle.instance_id}: freeze: {e}") from e

    def thaw(self, handle: InstanceHandle) -> None:
        from kiln.runtime.procfacts import freezer_dir, thaw_cgroup

        self._check_handle(handle)
        pid = self._sandbox_pid(handle)
        if pid is None:
            return
        try:
            thaw_cgroup(*freezer_dir(pid))
        except OSError as e:
            raise RuntimeFailure(f"instance {handle.instance_id}: thaw: {e}") from e

    def collect_evidence(
        self, handle: InstanceHandle, writable: builtins.list[str], into: Path
    ) -> dict[str, Any]:
        """Its writable paths (tmpfs mounts only it sees) through ``/proc/PID/root``, its
        cgroup's processes, the sockets listening in its network namespace."""
        from kiln.runtime.procfacts import (
            cgroup_pids,
            freezer_dir,
            listening_sockets,
            process_facts,
            tar_writable,
        )

        self._check_handle(handle)
        pid = self._sandbox_pid(handle)
        if pid is None:
            raise RuntimeFailure(f"instance {handle.instance_id}: not running, no evidence")
        pids = cgroup_pids(freezer_dir(pid)[1]) or [pid]
        tarred = tar_writable(pid, writable, into / "writable.tar")
        return {
            "processes": process_facts(pids),
            "network": {"address": handle.address, "listening": listening_sockets(pid)},
            "writable": tarred,
        }

    def stop(self, handle: InstanceHandle, grace: float, sig: int = SIGTERM) -> InstanceState:
        """``sig`` via the shim, up to ``grace`` seconds, then SIGKILL the container and shim."""
        self._check_handle(handle)
        if not self._shim_alive(handle):
            return self.inspect(handle)
        if sig in FORWARDED_SIGNALS:
            with contextlib.suppress(ProcessLookupError):
                os.kill(_shim_pid(handle), sig)
            state = self.wait(handle, grace)
            if state.status is not InstanceStatus.RUNNING:
                return state
        self._kill_sandbox(handle)
        state = self.wait(handle, SHIM_EXIT_TIMEOUT)
        if state.status is InstanceStatus.RUNNING and self._shim_alive(handle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(_shim_pid(handle), SIGKILL)
            state = self.wait(handle, SHIM_EXIT_TIMEOUT)
        return state

    def _kill_sandbox(self, handle: InstanceHandle) -> None:
        sandbox_pid = self._sandbox_pid(handle)
        if sandbox_pid is not None:
            frozen = _freezer_of(sandbox_pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(sandbox_pid, SIGKILL)
            if frozen is not None:
                # A frozen (quarantined) instance dies of the SIGKILL once thawed: it
                # runs no instruction of its own in between.
                from kiln.runtime.procfacts import thaw_cgroup

                with contextlib.suppress(OSError):
                    thaw_cgroup(*frozen)
        else:
            self.runc.kill(self.container_id(handle.instance_id), SIGKILL, all_processes=True)

    def destroy(self, handle: InstanceHandle) -> None:
        """Stop if needed, then release the container, its address and its directory; logs stay."""
        self._check_handle(handle)
        if self._shim_alive(handle):
            plan = _read_json(self._dir(handle.instance_id) / "spec.json") or {}
            self.stop(handle, float(plan.get("stop_grace", 10.0)))
        self.release(handle.instance_id)

    def release(self, instance_id: str) -> None:
        """Everything an instance held outside its logs, whether or not its shim cleaned up."""
        record = _read_json(self._dir(instance_id) / "exit.json") or {}
        handle = self.handle_for(instance_id)
        shim_gone = handle is None or not self._shim_alive(handle)
        if shim_gone and record.get("released"):
            # The shim deleted the container and freed the address itself.
            self._remove_dirs(instance_id)
            return
        try:
            self.runc.delete(self.container_id(instance_id))
        except KilnError as e:
            raise RuntimeFailure(f"instance {instance_id}: {e}") from e
        if self.network:
            from kiln.oci.network import BridgeNetwork

            BridgeNetwork(self.home).detach(instance_id)
        self._remove_dirs(instance_id)

    def _remove_dirs(self, instance_id: str) -> None:
        view = self.view_dir(instance_id)
        for leftover in (view / "rootfs", view):
            with contextlib.suppress(OSError):
                leftover.rmdir()
        shutil.rmtree(self._dir(instance_id), ignore_errors=True)

    def recover(self, handle: InstanceHandle) -> bool:
        if handle.runtime != self.name or not self._shim_alive(handle):
            return False
        try:
            cmdline = Path(f"/proc/{_shim_pid(handle)}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        expected = str(self._dir(handle.instance_id)).encode()
        return b"kiln.runtime.shim" in cmdline and expected in cmdline

    def handle_for(self, instance_id: str) -> InstanceHandle | None:
        """The handle recorded in an instance directory, live or not (None if never started)."""
        directory = self._dir(instance_id)
        info = _read_json(directory / "handle.json")
        plan = _read_json(directory / "spec.json")
        if info is None or plan is None:
            return None
        return InstanceHandle(
            version=HANDLE_VERSION,
            runtime=self.name,
            instance_id=instance_id,
            host=str(info.get("address") or "127.0.0.1"),
            port=int(plan.get("port") or 0),
            data={
                "shim_pid": int(info["shim_pid"]),
                "shim_start_time": int(info["shim_start_time"]),
                "sandbox_pid": info["sandbox_pid"],
                "sandbox_start_time": info["sandbox_start_time"],
                "container_id": info.get("container_id"),
                "dir": str(directory),
                "service": plan.get("meta", {}).get("service"),
            },
        )

    def list(self) -> list[InstanceHandle]:
        if not self.instances_dir.is_dir():
            return []
        handles = []
        for directory in sorted(self.instances_dir.iterdir()):
            handle = self.handle_for(directory.name)
            if handle is not None and self.recover(handle):
                handles.append(handle)
        return handles

    def leftovers(self) -> builtins.list[str]:
        """Instance directories whose shim is gone: dead instances not yet released."""
        if not self.instances_dir.is_dir():
            return []
        found = []
        for directory in sorted(self.instances_dir.iterdir()):
            handle = self.handle_for(directory.name)
            if handle is None or not self.recover(handle):
                found.append(directory.name)
        return found

    def publish_ports(self, ports: set[int]) -> None:
        """The proxy's listen ports: the only host ports an instance may reach."""
        if self.network:
            from kiln.oci.network import BridgeNetwork

            BridgeNetwork(self.home).publish_ports(ports)

    def shutdown(self) -> None:
        """With no instance left: the bridge, its rules and the runc root go (``kiln down``)."""
        if self.list():
            return
        for instance_id in self.leftovers():
            self.release(instance_id)
        if self.network:
            from kiln.oci.network import BridgeNetwork

            BridgeNetwork(self.home).remove()
        shutil.rmtree(self.runc.root.parent, ignore_errors=True)

    def exec(
        self, handle: InstanceHandle, argv: builtins.list[str], timeout: float
    ) -> tuple[int, str]:
        """Run ``argv`` inside the instance (``runc exec``) as its user, with its env."""
        self._check_handle(handle)
        if not self._shim_alive(handle):
            raise RuntimeFailure(f"instance {handle.instance_id}: not running, cannot exec")
        directory = self._dir(handle.instance_id)
        config = _read_json(directory / "bundle" / "config.json") or {}
        process = dict(config.get("process") or {})
        if not process:
            raise RuntimeFailure(f"instance {handle.instance_id}: no runtime config to exec with")
        process["args"] = list(argv)
        process_file = directory / f".exec-{os.getpid()}-{time.monotonic_ns()}.json"
        write_json_atomic(process_file, process)
        command = self.runc.exec_argv(self.container_id(handle.instance_id), process_file)
        tail = OutputTail()
        try:
            code = _run_bounded(command, tail, timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeFailure(
                f"instance {handle.instance_id}: exec {argv[0]!r} timed out after {timeout}s "
                "(still running, or a background process it started holds its output open: "
                "redirect that one's output, e.g. cmd >/dev/null 2>&1 &)"
            ) from e
        finally:
            process_file.unlink(missing_ok=True)
        return code, tail.text()


def _run_bounded(command: builtins.list[str], tail: OutputTail, timeout: float) -> int:
    """Run ``command``, keeping the tail of its output, until it exits: woken by its
    pidfd and its output pipe, not by polling. Past ``timeout`` the command is killed
    (TimeoutExpired). runc copies an exec's output through pipes of its own (the process
    runs as a mapped user) and exits only when they close, so a background process that
    keeps them open holds it, as it holds ``docker exec``."""
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    out = proc.stdout.fileno()
    os.set_blocking(out, False)
    exited = os.pidfd_open(proc.pid)
    deadline = time.monotonic() + timeout
    try:
        with select.epoll() as poll:
            poll.register(out, select.EPOLLIN)
            poll.register(exited, select.EPOLLIN)
            open_out = True
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    raise subprocess.TimeoutExpired(command, timeout)
                for fd, _ in poll.poll(left):
                    if fd == out and open_out:
                        open_out = _read_into(out, tail)
                        if not open_out:
                            poll.unregister(out)
                if proc.poll() is not None:
                    if open_out:
                        _read_into(out, tail)  # what it wrote before it exited
                    return int(proc.returncode)
    finally:
        os.close(exited)
        proc.stdout.close()


def _read_into(fd: int, tail: OutputTail) -> bool:
    """Read what is there now, at most 1 MiB (a writer that never pauses must not keep
    the caller from its deadline); False at end of file."""
    for _ in range(16):
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        tail.add(chunk)
    return True


def _freezer_of(pid: int) -> tuple[str, Path] | None:
    from kiln.runtime.procfacts import freezer_dir

    try:
        return freezer_dir(pid)
    except RuntimeFailure:
        return None


def _shim_pid(handle: InstanceHandle) -> int:
    try:
        return int(handle.data.get("shim_pid") or 0)
    except (TypeError, ValueError):
        return 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data
