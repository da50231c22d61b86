"""What a Kiln home may leave on the machine after ``kiln down``: nothing.

The issue's promise is "``kiln down`` leaves no process, mount, cgroup,
interface or secret copy". :func:`assert_nothing_left` checks all of them for
one home, from the host's point of view, without trusting the runtime's own
bookkeeping, so runtime, agent and end-to-end tests can end every story with
it. Call it only once the home's runtime has been shut down
(``LocalRuntime.shutdown()`` or ``kiln down``).

The names it looks for are the local runtime's (see ``kiln.oci.runc`` and
``kiln.oci.network``): container and cgroup ``kiln-<tag>-<instance>``,
runc root and views under ``/run/kiln/<tag>``, bridge ``kiln-<tag>``, host
veths ``kv<12 hex>``, nftables table ``inet kiln_<tag>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from kiln.observe.logs import LogStore
from kiln.oci.runc import RUN_ROOT, home_tag, runc_binary

__all__ = ["assert_nothing_left", "files_containing", "leftovers", "veth_name"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
NET_ROOT = Path("/sys/class/net")
_CHUNK = 1 << 20
ZOMBIE = "zombie"
SETTLE = 5.0
"""How long zombies may wait for their reaper: an instance whose shim was killed has
init (pid 1) as its reaper, and some inits reap only every few seconds."""


def veth_name(home: Path, instance_id: str) -> str:
    """The host end of an instance's veth (the formula of ``BridgeNetwork.attach``)."""
    tag = home_tag(home)
    return "kv" + hashlib.sha256(f"{tag}/{instance_id}".encode()).hexdigest()[:12]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root).rstrip("/") + "/")


def files_containing(roots: Iterable[Path], needle: bytes) -> list[Path]:
    """Regular files under ``roots`` whose bytes contain ``needle`` (no symlink is followed)."""
    if not needle:
        raise ValueError("an empty needle matches everything")
    found: list[Path] = []
    for root in roots:
        if not root.exists():
            continue
        for directory, _dirs, names in os.walk(root):
            for name in names:
                path = Path(directory) / name
                try:
                    if not stat.S_ISREG(path.lstat().st_mode):
                        continue
                    if _contains(path, needle):
                        found.append(path)
                except OSError:
                    continue
    return found


def _contains(path: Path, needle: bytes) -> bool:
    overlap = b""
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            if needle in overlap + chunk:
                return True
            overlap = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


def _known_instances(home: Path) -> set[str]:
    """Every instance id the home remembers: instance dirs, leases and (lasting) logs."""
    ids: set[str] = set()
    instances = home / "instances"
    if instances.is_dir():
        ids.update(p.name for p in instances.iterdir())
    with contextlib.suppress(OSError, ValueError):
        ids.update(json.loads((home / "network" / "leases.json").read_text()))
    logs = LogStore(home / "logs")
    if (home / "logs").is_dir():
        for service in logs.services():
            ids.update(meta.instance for meta in logs.instances(service))
    return ids


def _processes(home: Path, tag: str) -> list[str]:
    own = os.getpid()
    found: list[str] = []
    cgroup_mark = f"/kiln-{tag}-"
    run_mark = f"{RUN_ROOT}/{tag}/".encode()
    home_mark = f"{home}/instances/".encode()
    anywhere_in_home = f"{home}/".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cgroups = (entry / "cgroup").read_text()
            stat_text = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat_text[stat_text.index("(") + 1 : stat_text.rindex(")")]
        state, ppid = stat_text[stat_text.rindex(")") + 2 :].split()[:2]
        shown = cmdline.replace(b"\0", b" ").decode(errors="replace").strip() or f"[{name}]"
        if state == "Z" and cgroup_mark in cgroups:
            found.append(f"{ZOMBIE} {entry.name} [{name}] of parent {ppid} in a kiln-{tag} cgroup")
        elif b"kiln.runtime.shim" in cmdline and home_mark in cmdline:
            found.append(f"shim process {entry.name} ({shown})")
        elif run_mark in cmdline:
            found.append(f"process {entry.name} using {RUN_ROOT}/{tag} ({shown})")
        elif cgroup_mark in cgroups:
            found.append(f"process {entry.name} in a kiln-{tag} cgroup ({shown})")
        elif anywhere_in_home in cmdline:
            found.append(f"process {entry.name} naming the home ({shown})")
    return found


def _runc(tag: str) -> list[str]:
    root = RUN_ROOT / tag / "runc"
    found: list[str] = []
    if root.is_dir():
        result = subprocess.run(
            [runc_binary(), "--root", str(root), "list", "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        found += [f"runc container {name}" for name in result.stdout.split()]
    if (RUN_ROOT / tag).exists():
        inside = sorted(str(p.relative_to(RUN_ROOT / tag)) for p in (RUN_ROOT / tag).rglob("*"))
        found.append(f"runtime dir {RUN_ROOT / tag} (holding {inside or 'nothing'})")
    return found


def _mounts(home: Path, tag: str) -> list[str]:
    found: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        target = _unescape(fields[4])
        if _under(target, home) or _under(target, RUN_ROOT / tag):
            fstype = fields[fields.index("-") + 1]
            found.append(f"mount {target} ({fstype})")
    return found


def _cgroups(tag: str) -> list[str]:
    found: list[str] = []
    for directory, dirs, _files in os.walk(CGROUP_ROOT):
        for name in dirs:
            if f"kiln-{tag}" in name:
                found.append(f"cgroup {Path(directory) / name}")
    return found


def _interfaces(home: Path, tag: str) -> list[str]:
    bridge = f"kiln-{tag}"
    veths = {veth_name(home, i): i for i in _known_instances(home)}
    found: list[str] = []
    if not NET_ROOT.is_dir():
        return found
    for entry in sorted(NET_ROOT.iterdir()):
        master = entry / "master"
        on_bridge = master.exists() and master.resolve().name == bridge
        if entry.name == bridge:
            found.append(f"interface {bridge} (the home's bridge)")
        elif entry.name in veths:
            found.append(f"interface {entry.name} (veth of instance {veths[entry.name]})")
        elif on_bridge:
            found.append(f"interface {entry.name} (on bridge {bridge})")
    return found


def _firewall_and_subnet(home: Path, tag: str) -> list[str]:
    found: list[str] = []
    try:
        tables = subprocess.run(
            ["nft", "list", "tables"], capture_output=True, text=True, check=False
        ).stdout.split("\n")
    except FileNotFoundError:
        tables = []
    if f"table inet kiln_{tag}" in (t.strip() for t in tables):
        found.append(f"nftables table inet kiln_{tag}")
    try:
        registry = json.loads((RUN_ROOT / "subnets.json").read_text())
    except (OSError, ValueError):
        registry = {}
    for index, owner in registry.items():
        if owner == str(home):
            found.append(f"subnet #{index} still allocated in {RUN_ROOT / 'subnets.json'}")
    return found


def _secrets(home: Path, tag: str, values: Iterable[bytes]) -> list[str]:
    found: list[str] = []
    instances = home / "instances"
    if instances.is_dir():
        found += [f"secret dir {p}" for p in sorted(instances.glob("*/secrets"))]
    for number, value in enumerate(values, 1):
        for path in files_containing([home, RUN_ROOT / tag], value):
            found.append(f"a copy of secret value #{number} in {path}")
    return found


def leftovers(home: Path, secrets: Iterable[bytes] = ()) -> list[str]:
    """Everything this home still holds on the machine, one line each; [] when clean.

    ``secrets`` are values the story handed to instances: no file under the
    home or its ``/run/kiln`` dir may contain one (the encrypted store holds
    only ciphertext). Logs, volumes and the home itself may stay.
    """
    home = home.absolute()
    tag = home_tag(home)
    return [
        *_processes(home, tag),
        *_runc(tag),
        *_mounts(home, tag),
        *_cgroups(tag),
        *_interfaces(home, tag),
        *_firewall_and_subnet(home, tag),
        *_secrets(home, tag, list(secrets)),
    ]


def assert_nothing_left(home: Path, secrets: Iterable[bytes] = (), settle: float = SETTLE) -> None:
    """Fail with the list of what ``home`` left behind (see :func:`leftovers`).

    Only zombies get time (``settle`` seconds) to be reaped; anything else fails at once.
    """
    deadline = time.monotonic() + settle
    while True:
        found = leftovers(home, secrets)
        if not found:
            return
        if not all(f.startswith(ZOMBIE) for f in found) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    lines = "\n  ".join(found)
    raise AssertionError(f"KILN_HOME {home} (tag {home_tag(home.absolute())}) left:\n  {lines}")
