"""The per-instance supervisor of the local runtime (in the spirit of conmon).

``python -m kiln.runtime.shim --instance-dir DIR`` reads the launch plan the
runtime wrote to ``DIR/spec.json``, forks into the background (so the caller
never has to reap it and it outlives the agent), runs bwrap with pipes on
stdout/stderr, and:

* writes ``DIR/handle.json`` (its own pid + start time, the bwrap pid and the
  sandbox's pid-namespace init) as soon as the sandbox exists;
* timestamps every line into the instance log through ``LogWriter``;
* forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the app's
  process group inside the sandbox;
* writes ``DIR/exit.json`` atomically when the sandbox exits, then exits.

The launch plan holds no secret values: secrets are files the runtime wrote
into a 0700 directory that bwrap binds read-only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from kiln.observe.logs import LogMeta, LogStore, LogWriter
from kiln.process import proc_start_time
from kiln.runtime.cgroups import InstanceCgroup

__all__ = ["FORWARDED_SIGNALS", "app_pids", "main", "proc_start_time", "write_json_atomic"]

FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
MAX_LINE = 64 * 1024
INFO_TIMEOUT = 10.0


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def app_pids(sandbox_pid: int) -> list[int]:
    """The sandbox init's children: the app, each leading its own session/process group."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _parent_pid(int(entry)) == sandbox_pid:
            children.append(int(entry))
    return children


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Supervisor:
    def __init__(self, instance_dir: Path) -> None:
        self.dir = instance_dir
        self.plan: dict[str, Any] = json.loads((instance_dir / "spec.json").read_text())
        self.sandbox_pid: int | None = None
        self.pending: list[int] = []
        cgroup = self.plan.get("cgroup")
        self.cgroup = InstanceCgroup.from_json(cgroup) if cgroup else None

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        if self.sandbox_pid is None:
            self.pending.append(signum)
            return
        targets = app_pids(self.sandbox_pid)
        for pid in targets:
            try:
                os.killpg(pid, signum)
            except (ProcessLookupError, PermissionError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
        if not targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.sandbox_pid, signum)

    def prepare_child(self) -> None:
        """Runs in the forked child before exec, so bwrap and all it starts are limited."""
        if self.cgroup is not None:
            self.cgroup.join(os.getpid())
        rlimit_as = self.plan.get("rlimit_as")
        if rlimit_as:
            resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))

    def read_info(self, fd: int) -> dict[str, Any]:
        """bwrap's --info-fd JSON; empty when bwrap failed before creating the sandbox."""
        data = b""
        deadline = time.monotonic() + INFO_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(deadline - time.monotonic()):
                    break
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
                with contextlib.suppress(ValueError):
                    info: dict[str, Any] = json.loads(data)
                    return info
        return {}

    def run(self) -> int:
        writer = LogWriter(
            LogStore(Path(self.plan["log_root"])), LogMeta.from_json(self.plan["meta"])
        )
        for forwarded in FORWARDED_SIGNALS:
            signal.signal(forwarded, self.forward)
        info_r, info_w = os.pipe()
        argv = [self.plan["argv"][0], "--info-fd", str(info_w), *self.plan["argv"][1:]]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(info_w,),
                preexec_fn=self.prepare_child,
            )
        except (OSError, subprocess.SubprocessError) as e:
            writer.write("stderr", f"kiln: cannot start sandbox: {e}")
            self.write_exit(127, None, error=f"cannot start sandbox: {e}")
            return 1
        os.close(info_w)
        info = self.read_info(info_r)
        os.close(info_r)
        if "child-pid" in info:
            self.sandbox_pid = int(info["child-pid"])
            write_json_atomic(
                self.dir / "handle.json",
                {
                    "shim_pid": os.getpid(),
                    "shim_start_time": proc_start_time(os.getpid()),
                    "bwrap_pid": proc.pid,
                    "sandbox_pid": self.sandbox_pid,
                    "sandbox_start_time": proc_start_time(self.sandbox_pid),
                },
            )
            for pending in self.pending:
                self.forward(pending)
        stderr_tail = self.pump(proc, writer)
        code = proc.wait()
        writer.close()
        killed_by = -code if code < 0 else (code - 128 if code > 128 else None)
        exit_code = 128 - code if code < 0 else code
        error = None if self.sandbox_pid else f"sandbox failed: {stderr_tail or 'no output'}"
        self.write_exit(exit_code, killed_by, error=error)
        return 0

    def pump(self, proc: subprocess.Popen[bytes], writer: LogWriter) -> str:
        """Copy both pipes line by line into the log until the sandbox closes them."""
        assert proc.stdout is not None and proc.stderr is not None
        streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        partial = {fd: b"" for fd in streams}
        last_stderr = ""
        with selectors.DefaultSelector() as sel:
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                for key, _ in sel.select():
                    fd = int(key.fd)
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        sel.unregister(fd)
                        lines = [partial[fd]] if partial[fd] else []
                        partial[fd] = b""
                    else:
                        *lines, partial[fd] = (partial[fd] + chunk).split(b"\n")
                        while len(partial[fd]) > MAX_LINE:
                            lines.append(partial[fd][:MAX_LINE])
                            partial[fd] = partial[fd][MAX_LINE:]
                    now = time.time()
                    for raw in lines:
                        text = raw.decode("utf-8", errors="replace")
                        writer.write(streams[fd], text, ts=now)
                        if streams[fd] == "stderr":
                            last_stderr = text
        return last_stderr

    def write_exit(self, exit_code: int, signum: int | None, error: str | None = None) -> None:
        record: dict[str, Any] = {
            "exit_code": exit_code,
            "signal": signum,
            "finished": time.time(),
        }
        if self.cgroup is not None:
            record["oom_killed"] = self.cgroup.oom_killed()
        if error:
            record["error"] = error
        write_json_atomic(self.dir / "exit.json", record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.runtime.shim")
    parser.add_argument("--instance-dir", required=True, type=Path)
    parser.add_argument("--foreground", action="store_true", help="do not fork into the background")
    args = parser.parse_args(argv)
    supervisor = _Supervisor(args.instance_dir.absolute())
    if not args.foreground and os.fork() != 0:
        os._exit(0)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
