"""The per-instance supervisor of the local runtime (in the spirit of conmon).

``python -m kiln.runtime.shim --instance-dir DIR`` reads the launch plan in
``DIR/spec.json`` and the instance's secret values from its stdin (they never
touch a disk), forks into the background (so nobody has to reap it and it
outlives the agent), and then:

* enters a private mount namespace of its own, where it mounts a small tmpfs
  (the overlay's upper and work dirs, the secret files, the volume binds) and
  the instance's root: an overlay of the image's layer snapshots. Nothing is
  mounted in the host's namespace, so nothing can be left mounted there;
* becomes a child subreaper and runs ``runc create`` with pipes as the
  container's stdout/stderr, so the container's init becomes its child;
* gives the container's network namespace its address on the home's bridge,
  ``runc start``, then writes ``DIR/handle.json``;
* holds, through the descriptors the runtime handed it, shared locks on the
  image's layer snapshots, so ``kiln image gc`` leaves them alone while they
  are mounted (even if the image is removed meanwhile);
* timestamps every line into the instance log through ``LogWriter``;
* forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the
  container's init (tini, which passes them to the app's process group);
* when the container exits: records whether the memory cgroup OOM-killed it,
  releases the address, ``runc delete`` (cgroups, runtime state), unmounts,
  and writes ``DIR/exit.json`` atomically.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from kiln.observe.logs import LogMeta, LogStore, LogWriter
from kiln.oci.launch import (
    MS_BIND,
    MS_REC,
    become_subreaper,
    exit_code,
    mount,
    private_mount_namespace,
    umount_detached,
    wait_for,
)
from kiln.oci.runc import RUN_ROOT, Runc
from kiln.process import proc_start_time

__all__ = ["FORWARDED_SIGNALS", "main", "proc_start_time", "write_json_atomic"]

FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
MAX_LINE = 64 * 1024


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_view(plan: dict[str, Any], secrets: dict[str, bytes]) -> None:
    """The tmpfs view (overlay dirs, root, secret files, volume binds), in our namespace only.

    runc resolves the root and bind sources as the container's root, an
    unprivileged host uid, so they must sit under directories it may
    traverse: ``/run/kiln/<tag>/instances/<id>`` (0711), never under the
    owner-only ``KILN_HOME``. On the host that directory stays empty.
    """
    view = Path(plan["view"])
    base = int(plan["ids"]["base"])
    uid, gid = plan["user"]
    for parent in reversed(view.parents[: len(view.relative_to(RUN_ROOT).parts)]):
        parent.mkdir(mode=0o711, exist_ok=True)
        os.chmod(parent, 0o711)
    view.mkdir(mode=0o711, exist_ok=True)
    # runc exec starts from the root's path as seen on the host: keep an empty one there.
    (view / "rootfs").mkdir(mode=0o711, exist_ok=True)
    size = 16 * 1024 * 1024 + sum(len(v) + 4096 for v in secrets.values())
    mount("tmpfs", str(view), "tmpfs", 0, f"mode=0711,size={size}")
    upper, work, rootfs = view / "upper", view / "work", view / "rootfs"
    for directory in (upper, work, rootfs):
        directory.mkdir(mode=0o700)
    os.chown(upper, base, base)
    os.chmod(upper, 0o755)
    if secrets:
        secret_dir = view / "secrets"
        secret_dir.mkdir(mode=0o500)
        for name, value in secrets.items():
            path = secret_dir / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.chown(path, base + uid, base + gid)
        os.chown(secret_dir, base + uid, base + gid)
    volumes = view / "volumes"
    volumes.mkdir(mode=0o711)
    for index, source in enumerate(plan.get("volumes") or []):
        target = volumes / str(index)
        target.mkdir(mode=0o700)
        mount(source, str(target), None, MS_BIND | MS_REC, None)
    lower = ":".join(reversed(plan["layers"]))
    mount("overlay", str(rootfs), "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")


def memory_cgroup_dir(pid: int) -> Path | None:
    """Where the kernel counts this process's OOM kills (v1 memory or v2 unified)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    return None


def oom_kills(directory: Path | None) -> int:
    if directory is None:
        return 0
    for name in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(OSError, ValueError):
            for line in (directory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


class _Supervisor:
    def __init__(self, instance_dir: Path, secrets: dict[str, bytes]) -> None:
        self.dir = instance_dir
        self.plan: dict[str, Any] = json.loads((instance_dir / "spec.json").read_text())
        self.secrets = secrets
        self.runc = Runc(Path(self.plan["home"]), self.plan.get("runc"))
        self.container_id: str = self.plan["container_id"]
        self.sandbox_pid: int | None = None
        self.pending: list[int] = []
        self.notify_fd: int | None = None
        self.released = False

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        if self.sandbox_pid is None:
            self.pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.sandbox_pid, signum)

    def run(self) -> int:
        writer = LogWriter(
            LogStore(Path(self.plan["log_root"])), LogMeta.from_json(self.plan["meta"])
        )
        for forwarded in FORWARDED_SIGNALS:
            signal.signal(forwarded, self.forward)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            private_mount_namespace()
            prepare_view(self.plan, self.secrets)
            self.secrets.clear()
            become_subreaper()
            bundle = self.dir / "bundle"
            create = subprocess.run(
                self.runc.argv(
                    "--log",
                    str(self.dir / "runc.log"),
                    "--log-format",
                    "json",
                    "create",
                    "--bundle",
                    str(bundle),
                    "--pid-file",
                    str(self.dir / "pid"),
                    self.container_id,
                ),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as e:
            return self.fail(writer, f"cannot create sandbox: {e}")
        finally:
            os.close(out_w)
            os.close(err_w)
        if create.returncode != 0:
            tail = _drain(err_r) or _runc_log_error(self.dir / "runc.log")
            os.close(out_r)
            os.close(err_r)
            return self.fail(writer, f"cannot create sandbox: {tail or 'runc create failed'}")
        self.sandbox_pid = int((self.dir / "pid").read_text().strip())
        memory_dir = memory_cgroup_dir(self.sandbox_pid)
        lease: dict[str, Any] | None = None
        try:
            if self.plan.get("network"):
                from kiln.oci.network import BridgeNetwork

                lease = (
                    BridgeNetwork(Path(self.plan["home"]))
                    .attach(
                        self.plan["instance_id"],
                        self.sandbox_pid,
                        outbound=bool(self.plan["network"].get("outbound")),
                    )
                    .to_json()
                )
            sandbox_start_time = proc_start_time(self.sandbox_pid)
            # handle.json (how a runtime finds us to signal) only once the app runs: a stop
            # racing runc start would kill runc's init and read as "cannot start sandbox".
            self.runc.start(self.container_id)
            await_init(self.sandbox_pid, with_init=bool(self.plan.get("init")))
            write_json_atomic(
                self.dir / "handle.json",
                {
                    "shim_pid": os.getpid(),
                    "shim_start_time": proc_start_time(os.getpid()),
                    "sandbox_pid": self.sandbox_pid,
                    "sandbox_start_time": sandbox_start_time,
                    "container_id": self.container_id,
                    "address": lease["address"] if lease else None,
                },
            )
            self.notify()
        except Exception as e:
            self.teardown()
            # The init is our child (subreaper), so its pid cannot be reused before we reap
            # it: make sure it is dead (runc delete may have failed), then leave no zombie.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.sandbox_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.sandbox_pid, 0)
            os.close(out_r)
            os.close(err_r)
            return self.fail(writer, f"cannot start sandbox: {e}")
        for pending in self.pending:
            self.forward(pending)
        self.pump({out_r: "stdout", err_r: "stderr"}, writer)
        status = wait_for(self.sandbox_pid)
        writer.close()
        killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        oom = oom_kills(memory_dir) > 0
        self.teardown()
        self.write_exit(exit_code(status), killed_by, oom_killed=oom)
        return 0

    def teardown(self) -> None:
        """Container, cgroups, address and mounts go; ``released`` says all of it went,
        so the runtime's destroy need not do it again."""
        released = True
        try:
            self.runc.delete(self.container_id)
        except Exception:
            released = False
        if self.plan.get("network"):
            from kiln.oci.network import BridgeNetwork

            try:
                BridgeNetwork(Path(self.plan["home"])).detach(self.plan["instance_id"])
            except Exception:
                released = False
        self.released = released
        view = Path(self.plan["view"])
        with contextlib.suppress(OSError):
            umount_detached(view)
        for leftover in (view / "rootfs", view):
            with contextlib.suppress(OSError):
                leftover.rmdir()

    def notify(self) -> None:
        """Tell the runtime that handle.json or exit.json is there (or, by EOF, that we died)."""
        if self.notify_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.notify_fd, b"1")
            os.close(self.notify_fd)
            self.notify_fd = None

    def fail(self, writer: LogWriter, error: str) -> int:
        writer.write("stderr", f"kiln: {error}")
        writer.close()
        self.teardown()
        self.write_exit(127, None, error=error)
        self.notify()
        return 1

    def pump(self, streams: dict[int, str], writer: LogWriter) -> None:
        """Copy both pipes line by line into the log until every writer has closed them."""
        partial = {fd: b"" for fd in streams}
        with selectors.DefaultSelector() as sel:
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                for key, _ in sel.select():
                    fd = int(key.fd)
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        sel.unregister(fd)
                        os.close(fd)
                        lines = [partial[fd]] if partial[fd] else []
                        partial[fd] = b""
                    else:
                        *whole, partial[fd] = (partial[fd] + chunk).split(b"\n")
                        lines = [p for line in whole for p in _cut(line)]
                        while len(partial[fd]) > MAX_LINE:
                            lines.append(partial[fd][:MAX_LINE])
                            partial[fd] = partial[fd][MAX_LINE:]
                    now = time.time()
                    for raw in lines:
                        writer.write(streams[fd], raw.decode("utf-8", errors="replace"), ts=now)

    def write_exit(
        self,
        exit_code: int,
        signum: int | None,
        *,
        oom_killed: bool = False,
        error: str | None = None,
    ) -> None:
        record: dict[str, Any] = {
            "exit_code": exit_code,
            "signal": signum,
            "finished": time.time(),
            "oom_killed": oom_killed,
            "released": self.released,
        }
        if error:
            record["error"] = error
        write_json_atomic(self.dir / "exit.json", record)


def await_init(pid: int, *, with_init: bool, timeout: float = 2.0) -> None:
    """Until the container's pid 1 is the image's program, not runc's init, and, for
    tini, until it has set up its signals: the kernel drops a signal that a namespace's
    init neither blocks nor handles, so a stop sent earlier would be lost and wait out
    the grace. tini blocks what it forwards, then ignores SIGTTIN and SIGTTOU; the
    second is what /proc shows (a waiting sigtimedwait hides the first)."""
    ready = (1 << (signal.SIGTTIN - 1)) | (1 << (signal.SIGTTOU - 1))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            )
        except (OSError, ValueError):
            return
        execed = not fields.get("Name", "").strip().startswith("runc")
        if execed and (not with_init or int(fields.get("SigIgn", "0"), 16) & ready == ready):
            return
        time.sleep(0.0005)


def _cut(line: bytes) -> list[bytes]:
    """A line longer than MAX_LINE is logged as MAX_LINE pieces."""
    return [line[i : i + MAX_LINE] for i in range(0, len(line), MAX_LINE)] or [b""]


def _drain(fd: int) -> str:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 65536):
            data += chunk
    lines = [x for x in data.decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1] if lines else ""


def _runc_log_error(path: Path) -> str:
    """runc's own last error: what it could not do while creating the container."""
    message = ""
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("level") in ("error", "fatal"):
                    message = str(entry.get("msg", ""))
    return message


def read_secrets(stream: Any) -> dict[str, bytes]:
    """``{"name": base64}`` on stdin; an empty stdin means no secrets."""
    raw = stream.read()
    if not raw.strip():
        return {}
    return {str(k): base64.b64decode(v) for k, v in json.loads(raw).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.runtime.shim")
    parser.add_argument("--instance-dir", required=True, type=Path)
    parser.add_argument("--foreground", action="store_true", help="do not fork into the background")
    parser.add_argument("--notify-fd", type=int, help="written to, then closed, once started")
    args = parser.parse_args(argv)
    secrets = read_secrets(sys.stdin.buffer)
    supervisor = _Supervisor(args.instance_dir.absolute(), secrets)
    supervisor.notify_fd = args.notify_fd
    if not args.foreground and os.fork() != 0:
        os._exit(0)
    with contextlib.suppress(OSError):
        os.setsid()
    try:
        return supervisor.run()
    except OSError as e:
        if e.errno == errno.EPERM:
            supervisor.write_exit(127, None, error=f"not permitted: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
