"""The host side of the escape suite: targets the attacks aim at and readings of host state.

Every runner (local runtime, bake steps, later Docker and Swarm) sets up the
same targets: a TCP server on 127.0.0.1 and one on 0.0.0.0 that greet with a
banner and count connections, a unix socket standing in for the agent's, an
abstract unix socket, a host process to signal, a host file only host root may
read. Everything here is started by the test and stopped by it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "BannerServer",
    "DatagramCounter",
    "HostSleep",
    "ProcessSampler",
    "b64",
    "free_port",
    "host_addresses",
    "host_listener_on",
    "loaded_modules",
    "peak_rss_mb",
    "process_count",
    "sha256_file",
    "shadow_first_line",
    "sysctl_fingerprint",
    "token",
    "unix_listener",
]

# Stable tunables an attack could aim at; read, never written, by the tests.
SYSCTLS = (
    "kernel/core_pattern",
    "kernel/modprobe",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/sysrq",
    "kernel/randomize_va_space",
    "kernel/kptr_restrict",
    "kernel/dmesg_restrict",
    "kernel/unprivileged_bpf_disabled",
    "kernel/hostname",
    "vm/overcommit_memory",
    "vm/swappiness",
    "fs/protected_hardlinks",
    "fs/protected_symlinks",
    "fs/suid_dumpable",
    "user/max_user_namespaces",
)


def token(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sysctl_fingerprint() -> dict[str, str]:
    found = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            found[name] = Path("/proc/sys", name).read_text()
    return found


def loaded_modules() -> list[str] | None:
    """Loaded kernel modules (None on a kernel without module support)."""
    try:
        text = Path("/proc/modules").read_text()
    except FileNotFoundError:
        return None
    return sorted(line.split()[0] for line in text.splitlines())


def process_count() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set) of a host process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def host_listener_on(port: int) -> bool:
    """Whether any TCP socket of the host's network namespace listens on ``port``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def host_addresses(exclude_prefix: str = "kiln-") -> list[str]:
    """The host's own IPv4 addresses off loopback and off Kiln bridges."""
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
    found = []
    for link in json.loads(out.stdout or "[]"):
        if link.get("ifname", "").startswith(exclude_prefix):
            continue
        for info in link.get("addr_info", []):
            address = ipaddress.ip_address(info["local"])
            if not address.is_loopback:
                found.append(str(address))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def shadow_first_line() -> str:
    """The host's first /etc/shadow entry: a value no sandbox may ever print."""
    try:
        lines = Path("/etc/shadow").read_text().splitlines()
    except OSError:
        return ""
    return lines[0] if lines else ""


class BannerServer:
    """A TCP server on the host that greets every connection with a banner and counts them."""

    def __init__(self, address: str, banner: str) -> None:
        self.banner = banner
        self.accepted = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.banner.encode() + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class DatagramCounter:
    """A UDP socket on the host that counts the datagrams it receives."""

    def __init__(self, address: str) -> None:
        self.received = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@contextlib.contextmanager
def unix_listener(path: str | bytes) -> Iterator[socket.socket]:
    """A listening unix socket at ``path`` (a ``\\0``-prefixed name is abstract)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
        yield sock
    finally:
        sock.close()
        if isinstance(path, str) and not path.startswith("\0"):
            with contextlib.suppress(OSError):
                os.unlink(path)


class HostSleep:
    """A host process with a unique command line, for the attacks to look for and signal."""

    def __init__(self) -> None:
        self.marker = f"3600.{secrets.randbelow(10**9):09d}"
        self.proc = subprocess.Popen(["sleep", self.marker])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class ProcessSampler:
    """Sampled every few ms until stopped: the host's process count, the processes
    in the fullest pids cgroup named ``cgroup_prefix*`` (a sandbox's), and how long
    the host takes to fork and run ``true`` (its responsiveness)."""

    def __init__(self, cgroup_prefix: str | None = None) -> None:
        self.prefix = cgroup_prefix
        self.baseline = process_count()
        self.peak = self.baseline
        self.cgroup_peak = 0
        self.slowest_fork = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _cgroup_count(self) -> int:
        """The most processes any one matching sandbox holds right now."""
        if self.prefix is None:
            return 0
        most = 0
        # A cgroup that goes away in the middle of the walk ends the walk, not the sampler.
        with contextlib.suppress(OSError):
            for path in Path("/sys/fs/cgroup/pids").glob(f"**/{self.prefix}*/pids.current"):
                with contextlib.suppress(OSError, ValueError):
                    most = max(most, int(path.read_text()))
        return most

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, process_count())
            self.cgroup_peak = max(self.cgroup_peak, self._cgroup_count())
            started = time.monotonic()
            subprocess.run(["true"], check=False)
            self.slowest_fork = max(self.slowest_fork, time.monotonic() - started)
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert self.slowest_fork < 2.0, f"the host stalled: a fork took {self.slowest_fork:.2f}s"

    def rise(self) -> float:
        self.stop()
        return float(self.peak - self.baseline)

    def sandbox_peak(self) -> float:
        self.stop()
        return float(self.cgroup_peak)
