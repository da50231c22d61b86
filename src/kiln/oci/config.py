"""The OCI runtime config (``config.json``) of a Kiln sandbox.

One builder for instances and bake steps, so both hold the same line: a user
namespace onto the home's id range, its own pid/ipc/uts/mount/cgroup (and
network) namespaces, Docker's masked and read-only paths, Kiln's seccomp
profile, ``no_new_privileges``, a pids limit always, memory and CPU when set,
and the capabilities asked for — none by default.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.oci.idmap import IdRange
from kiln.oci.seccomp import oci_seccomp

__all__ = [
    "BUILD_CAPABILITIES",
    "DEFAULT_PIDS",
    "MASKED_PATHS",
    "READONLY_PATHS",
    "Mount",
    "SandboxConfig",
    "capability_name",
    "runtime_config",
]

DEFAULT_PIDS = 1024
CPU_PERIOD_US = 100_000

MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/kmsg",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/sysrq-trigger",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/sys/kernel/debug",
    "/sys/kernel/security",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# Docker's default set, which `docker build` RUN steps get (apt and dpkg need them).
BUILD_CAPABILITIES = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)
KNOWN_CAPABILITIES = frozenset(
    {
        *BUILD_CAPABILITIES,
        "CAP_DAC_READ_SEARCH",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_LEASE",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_ADMIN",
        "CAP_NET_BROADCAST",
        "CAP_SYS_NICE",
        "CAP_SYS_PTRACE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TTY_CONFIG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_TIME",
        "CAP_SYSLOG",
        "CAP_MAC_ADMIN",
        "CAP_MAC_OVERRIDE",
        "CAP_AUDIT_CONTROL",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
        "CAP_SYS_PACCT",
    }
)


def capability_name(name: str) -> str:
    """``net_bind_service``, ``NET_BIND_SERVICE`` or ``CAP_NET_BIND_SERVICE`` → the CAP_ name."""
    upper = name.strip().upper()
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full not in KNOWN_CAPABILITIES:
        raise KilnError(f"unknown capability {name!r}")
    return full


@dataclass(frozen=True)
class Mount:
    destination: str
    type: str
    source: str
    options: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "type": self.type,
            "source": self.source,
            "options": list(self.options),
        }


@dataclass(frozen=True)
class SandboxConfig:
    """What differs between sandboxes; everything else is the hardened default."""

    args: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    rootfs: Path
    ids: IdRange
    hostname: str
    cgroups_path: str
    uid: int = 0
    gid: int = 0
    readonly_root: bool = True
    mounts: tuple[Mount, ...] = ()
    capabilities: tuple[str, ...] = ()
    seccomp: bool = True
    no_new_privileges: bool = True
    memory: int | None = None
    cpu: float | None = None
    pids: int = DEFAULT_PIDS
    network_namespace: bool = True
    sysctl: dict[str, str] = field(default_factory=dict)
    nofile: int = 1 << 20
    """Capped at the caller's own hard limit: a user namespace cannot raise it."""


def _default_mounts(network_namespace: bool) -> list[Mount]:
    mounts = [
        Mount("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
        Mount("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
        Mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"),
        ),
        Mount(
            "/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")
        ),
        Mount("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ]
    if network_namespace:
        # sysfs may only be mounted by the owner of the network namespace.
        mounts.append(Mount("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")))
    return mounts


def runtime_config(cfg: SandboxConfig) -> dict[str, Any]:
    """The whole ``config.json`` for runc."""
    if not 0 <= cfg.uid < cfg.ids.size or not 0 <= cfg.gid < cfg.ids.size:
        raise KilnError(
            f"user {cfg.uid}:{cfg.gid} is outside the {cfg.ids.size} ids a sandbox maps"
        )
    caps = sorted(set(cfg.capabilities))
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user", "cgroup")]
    if cfg.network_namespace:
        namespaces.append({"type": "network"})
    resources: dict[str, Any] = {
        "devices": [{"allow": False, "access": "rwm"}],
        "pids": {"limit": cfg.pids},
    }
    if cfg.memory is not None:
        resources["memory"] = {"limit": cfg.memory, "swap": cfg.memory}
    if cfg.cpu is not None:
        resources["cpu"] = {
            "quota": max(1000, int(cfg.cpu * CPU_PERIOD_US)),
            "period": CPU_PERIOD_US,
        }
    nofile = min(cfg.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    sysctl = dict(cfg.sysctl)
    if cfg.network_namespace:
        # As Docker does: low ports and ping need no capability inside a private network.
        sysctl.setdefault("net.ipv4.ip_unprivileged_port_start", "0")
        sysctl.setdefault("net.ipv4.ping_group_range", f"0 {cfg.ids.size - 1}")
    linux: dict[str, Any] = {
        "uidMappings": cfg.ids.oci_mappings(),
        "gidMappings": cfg.ids.oci_mappings(),
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": cfg.cgroups_path,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
        "sysctl": sysctl,
        "rootfsPropagation": "private",
    }
    if cfg.seccomp:
        linux["seccomp"] = oci_seccomp(tuple(caps))
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": cfg.uid, "gid": cfg.gid, "additionalGids": [cfg.gid]},
            "args": list(cfg.args),
            "env": [f"{k}={v}" for k, v in sorted(cfg.env.items())],
            "cwd": cfg.cwd or "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
                "inheritable": [],
                "ambient": caps if cfg.uid != 0 else [],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": cfg.no_new_privileges,
        },
        "root": {"path": str(cfg.rootfs), "readonly": cfg.readonly_root},
        "hostname": cfg.hostname,
        "mounts": [m.to_json() for m in [*_default_mounts(cfg.network_namespace), *cfg.mounts]],
        "linux": linux,
    }
