"""Compile Kiln's seccomp profile (``seccomp.json`` beside this file) into the
``linux.seccomp`` section of an OCI runtime config, for this machine's
architecture and the capabilities the sandbox keeps.

The profile follows Docker's default: an allow-list with EPERM for the rest,
and the calls a capability guards allowed only when that capability is kept.
"""

from __future__ import annotations

import json
import platform
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["oci_seccomp", "profile"]

_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}


@cache
def profile() -> dict[str, Any]:
    text = resources.files("kiln.oci").joinpath("seccomp.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def oci_seccomp(capabilities: tuple[str, ...], machine: str | None = None) -> dict[str, Any]:
    """The OCI seccomp section for a sandbox that keeps ``capabilities`` (``CAP_*`` names)."""
    p = profile()
    arch = machine or platform.machine()
    kept = set(capabilities)
    names: set[str] = set(p["allow"]) | set(p["allow_on_arch"].get(arch, []))
    for cap, calls in p["allow_with_capability"].items():
        if cap in kept:
            names.update(calls)
    syscalls: list[dict[str, Any]] = [{"names": sorted(names), "action": "SCMP_ACT_ALLOW"}]
    syscalls.append(
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {"index": 0, "value": family, "op": "SCMP_CMP_NE"}
                for family in p["socket_denied_families"]
            ],
        }
    )
    for persona in p["personality_allowed"]:
        syscalls.append(
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}],
            }
        )
    if "CAP_SYS_ADMIN" not in kept:
        mask = p["clone_namespace_mask"]
        syscalls.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
        syscalls.append(
            {
                "names": ["clone3"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": p["clone3_errno_without_sys_admin"],
            }
        )
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": p["default_errno"],
        "architectures": _ARCHES.get(arch, []),
        "syscalls": syscalls,
    }
