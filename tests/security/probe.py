"""The escape suite's one source of truth: the probe app and the attack list.

Every runtime (local runc today, Docker and Swarm later) and the bake ``run``
steps run the same :data:`ATTACKS` against the same probe image, so a hole
closed in one place is checked everywhere.

The probe app is a busybox image whose app is ``httpd -f -p $PORT -h /www``
with one CGI script, ``/www/cgi-bin/run``: it executes the POSTed body with
``sh`` as the image user and answers its stdout and stderr followed by a last
line ``EXIT=<status>``. The body also finds the instance's own log stream on
fd 9 (to flood the log). A bake step runs the same commands as its command.

Convention: every attack command exits 0 **only if the attack worked** (it
wrote, read, mounted, reached... what it must not), so a non-zero exit means
"blocked". Commands are ``str.format`` templates over the variables the host
side prepared (:class:`Host`); an attack whose variables or host observations
a runner cannot supply is skipped there, never silently passed.

A runner (see ``test_escape_local.py`` and ``test_escape_bake.py``) supplies a
:class:`Host`: template variables (host pids, ports, addresses, secrets...),
host observations (callables whose value must not change across the attack),
and names of the sandbox kinds it can start for attacks that need their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from busybox_tree import build_busybox_rootfs

__all__ = [
    "AFTER_IMAGE_TRICK",
    "ATTACKS",
    "CGI_SCRIPT",
    "IMAGE_TRICKS",
    "INSTANCE",
    "MALICIOUS_WORKDIRS",
    "STEP",
    "WORKDIR_ESCAPE",
    "Attack",
    "Host",
    "Outcome",
    "attack_named",
    "build_probe_tree",
    "build_trick_layer",
    "execute",
    "file_state",
    "finish_probe_tree",
    "foreign_entries",
    "iter_attacks",
    "judge",
    "parse_cgi",
    "remove_device_nodes",
    "tree_fingerprint",
]

INSTANCE = "instance"
STEP = "step"
BOTH = frozenset({INSTANCE, STEP})
ONLY_INSTANCE = frozenset({INSTANCE})
ONLY_STEP = frozenset({STEP})

# The app executes the body; fd 9 is the instance's own stderr (its log stream).
CGI_SCRIPT = """#!/bin/sh
echo "Content-Type: text/plain"
echo ""
body=$(head -c "${CONTENT_LENGTH:-0}")
sh -c "$body" 9>&2 2>&1 </dev/null
echo "EXIT=$?"
"""

# Device nodes planted in the probe image by the host (as a malicious image would
# carry them): the device cgroup must refuse them even to root inside.
IMAGE_DEVICES = {
    "disk": (stat.S_IFBLK, "root_disk"),
    "mem": (stat.S_IFCHR, (1, 1)),
    "kmsg": (stat.S_IFCHR, (1, 11)),
}


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    output: str
    measured: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    """One escape attempt: a shell command that exits 0 only if it worked.

    ``says``: a regex the output must match (the expected refusal), when the
    refusal is specific enough to be worth pinning. ``never``: templates of
    strings that must not appear in the output (a secret, a banner, a marker).
    ``unchanged``: names of host observations that must read the same before
    and after. ``needs``: template variables or observations the runner must
    supply, or the attack is skipped there. ``sandbox``: a sandbox kind the
    attack needs for itself (``"own"``: a fresh probe, because the attack
    kills or exhausts it; ``"pids"``, ``"memory"``: one with a small limit).
    ``bounded``: (monitor, limit template) pairs, a host measurement taken
    during the attack that must stay at or under the limit. ``action`` and
    ``then``: something the host does after ``command`` (e.g. ``runc exec``
    while the command races it), then the command whose outcome is judged.
    """

    name: str
    command: str
    says: str | None = None
    never: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    where: frozenset[str] = BOTH
    sandbox: str | None = None
    bounded: tuple[tuple[str, str], ...] = ()
    action: str | None = None
    then: str | None = None
    timeout: float = 30.0
    doc: str = ""

    def required(self) -> set[str]:
        names = set(self.needs) | set(self.unchanged) | {name for name, _ in self.bounded}
        if self.action is not None:
            names.add(self.action)
        for text in (self.command, *self.never, self.then or "", *(b for _, b in self.bounded)):
            names.update(m.group(1) for m in re.finditer(r"\{(\w+)\}", text))
        return names

    def render(self, variables: Mapping[str, str]) -> str:
        return self.command.format(**variables)

    def render_then(self, variables: Mapping[str, str]) -> str | None:
        return None if self.then is None else self.then.format(**variables)


@dataclass
class Host:
    """What one runner prepared on the host for the attacks.

    ``observations``: name → a reading of host state, compared before/after.
    ``monitors``: name → start watching; returns a function giving the value
    (a peak, a count) when the attack is over, checked against ``bounded``.
    ``actions``: name → what the host does between ``command`` and ``then``.
    """

    kind: str
    variables: dict[str, str] = field(default_factory=dict)
    observations: dict[str, Callable[[], object]] = field(default_factory=dict)
    monitors: dict[str, Callable[[], Callable[[], float]]] = field(default_factory=dict)
    actions: dict[str, Callable[[], None]] = field(default_factory=dict)
    sandboxes: set[str] = field(default_factory=set)
    secret_names: set[str] = field(default_factory=set)

    def missing(self, attack: Attack) -> set[str]:
        have = set(self.variables) | set(self.observations) | set(self.monitors)
        have |= set(self.actions)
        missing = attack.required() - have
        if attack.sandbox is not None and attack.sandbox not in self.sandboxes:
            missing.add(f"sandbox:{attack.sandbox}")
        return missing

    def observe(self, attack: Attack) -> dict[str, object]:
        return {name: self.observations[name]() for name in attack.unchanged}


def judge(
    attack: Attack,
    outcome: Outcome,
    host: Host,
    before: Mapping[str, object],
    after: Mapping[str, object],
    measured: Mapping[str, float] | None = None,
) -> None:
    """Raise AssertionError unless the attack failed and left the host as it was."""
    shown = outcome.output[-3000:]
    problems = []
    if outcome.exit_code == 0:
        problems.append("the command succeeded (exit 0): the attack WORKED")
    if attack.says is not None and not re.search(attack.says, outcome.output):
        problems.append(f"expected a refusal matching {attack.says!r}")
    for template in attack.never:
        value = template.format(**host.variables)
        if value and value in outcome.output:
            name = template.strip("{}")
            problems.append(f"the output contains {name!r}, which must stay out of reach")
            if name in host.secret_names:
                shown = "<withheld: it contains a host secret>"
    for name in attack.unchanged:
        if before[name] != after[name]:
            problems.append(f"host {name} changed: {before[name]!r} -> {after[name]!r}")
    for name, limit in attack.bounded:
        value = (measured or {})[name]
        if value > float(limit.format(**host.variables)):
            problems.append(f"host {name} reached {value:g}, over {limit.format(**host.variables)}")
    if problems:
        raise AssertionError(
            f"{host.kind} escape {attack.name!r}: "
            + "; ".join(problems)
            + f"\n--- command ---\n{attack.render(host.variables)}\n"
            + f"--- exit {outcome.exit_code}, output ---\n{shown}"
        )


def parse_cgi(body: str) -> Outcome:
    """The probe's answer: output lines, then ``EXIT=<n>`` last."""
    text = body.rstrip("\n")
    head, _, last = text.rpartition("\n")
    if not last.startswith("EXIT="):
        if text.startswith("EXIT="):
            return Outcome(int(text[5:]), "")
        # The CGI shell itself died (e.g. OOM-killed): no status line.
        return Outcome(-1, text)
    return Outcome(int(last[5:]), head)


# -- the probe image


def build_probe_tree(dest: Path, *, devices: bool = True) -> Path:
    """The probe image root: busybox, the CGI app, a setuid-root busybox, device nodes.

    Ownership is left to the caller (shift it into the home's range with
    ``os.lchown(p, ids.base, ids.base)``). ``devices`` plants block/char
    nodes a malicious image could carry; remove them with
    :func:`remove_device_nodes` when done.
    """
    build_busybox_rootfs(
        dest,
        www={"index.html": "probe\n"},
        mount_points=("proc", "dev", "tmp", "run", "sys", "data"),
    )
    cgi = dest / "www" / "cgi-bin"
    cgi.mkdir()
    (cgi / "run").write_text(CGI_SCRIPT)
    (cgi / "run").chmod(0o755)
    # Real images have a world-writable sticky /tmp; runc keeps the mount point's mode.
    (dest / "tmp").chmod(0o1777)
    suid = dest / "suid"
    suid.mkdir(mode=0o755)
    shutil.copy2(dest / "bin" / "busybox", suid / "busybox")
    for applet in ("su", "ping"):
        (suid / applet).symlink_to("busybox")
    if devices:
        nodes = dest / "devices"
        nodes.mkdir(mode=0o755)
        root_dev = os.stat("/").st_dev
        for name, (kind, numbers) in IMAGE_DEVICES.items():
            major, minor = (
                (os.major(root_dev), os.minor(root_dev)) if numbers == "root_disk" else numbers
            )
            os.mknod(nodes / name, kind | 0o660, os.makedev(major, minor))
    return dest


def finish_probe_tree(dest: Path, uid: int, gid: int) -> None:
    """Shift ownership into the home's range; then the setuid bit (chown clears it)."""
    for path in [dest, *dest.rglob("*")]:
        os.lchown(path, uid, gid)
    (dest / "suid" / "busybox").chmod(0o4755)


def remove_device_nodes(root: Path) -> None:
    """Block and character devices planted in a tree (whiteouts 0/0 excepted)."""
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            st = path.lstat()
            if (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)) and st.st_rdev != 0:
                path.unlink()


def tree_fingerprint(root: Path) -> str:
    """Every entry's type, mode, owner, size, mtime and content hash under ``root``."""
    digest = hashlib.sha256()
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        digest.update(
            f"{path.relative_to(root)}|{st.st_mode:o}|{st.st_uid}|{st.st_gid}|"
            f"{st.st_size}|{st.st_mtime_ns}|{st.st_rdev}\n".encode()
        )
        if stat.S_ISREG(st.st_mode):
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        elif stat.S_ISLNK(st.st_mode):
            digest.update(os.readlink(path).encode())
    return digest.hexdigest()


def foreign_entries(root: Path, low: int, high: int) -> list[str]:
    """Entries under ``root`` a sandbox must never be able to leave behind: owned by
    an id outside ``[low, high)`` (e.g. host root), setuid/setgid owned by host
    root, or device nodes."""
    found = []
    for path in [root, *root.rglob("*")]:
        try:
            st = path.lstat()
        except OSError:
            continue
        rel = str(path.relative_to(root))
        if not (low <= st.st_uid < high and low <= st.st_gid < high):
            found.append(f"{rel}: owned by host {st.st_uid}:{st.st_gid}")
        if (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)) and st.st_rdev != 0:
            found.append(f"{rel}: device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    return found


def file_state(path: Path) -> tuple[int, int, int, int, int, str] | None:
    """Owner, mode, links, mtime and content of a host file (None if it is gone)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    content = hashlib.sha256(path.read_bytes()).hexdigest()
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink, st.st_mtime_ns, content)


def iter_attacks(kind: str) -> Iterable[Attack]:
    return (a for a in ATTACKS if kind in a.where)


# -- the attack list


def _any_of(*commands: str) -> str:
    """Shell: run each command (in a subshell); exit 0 iff at least one succeeded."""
    lines = ["hit=1"]
    for command in commands:
        quoted = command.replace("'", "'\\''")
        lines.append(f"if ( {command} ); then hit=0; echo 'ESCAPED: {quoted}'; fi")
    lines.append("exit $hit")
    return "\n".join(lines)


_PROC_SYS_ALL = r"""
hit=1; n=0
for f in $(find /proc/sys -type f 2>/dev/null); do
  v=$(cat "$f" 2>/dev/null) || continue
  n=$((n+1))
  if (printf '%s\n' "$v" > "$f") 2>/dev/null; then hit=0; echo "WROTE $f"; fi
done
echo "tried $n files"
exit $hit
"""

_SYS_WRITE = r"""
hit=1
for f in /sys/kernel/uevent_helper /sys/kernel/mm/transparent_hugepage/enabled \
         /sys/class/net/eth0/mtu /sys/class/net/lo/mtu /sys/fs/cgroup/release_agent \
         /sys/kernel/profiling /sys/power/state; do
  [ -e "$f" ] || continue
  v=$(cat "$f" 2>/dev/null) || v=""
  if (printf '%s\n' "$v" > "$f") 2>/dev/null; then hit=0; echo "WROTE $f"; fi
done
exit $hit
"""

_READ_BYTES = r"""
hit=1
for f in {files}; do
  n=$(timeout 2 cat "$f" 2>/dev/null | wc -c)
  echo "$f: $n bytes"
  [ "$n" -gt 0 ] && hit=0
done
exit $hit
"""

_DEVICES_IN_DEV = r"""
ls -a /dev
hit=1
for d in /dev/*; do
  [ -b "$d" ] || [ -c "$d" ] || continue
  case "${{d#/dev/}}" in
    null|zero|full|random|urandom|tty|ptmx|pts|shm|mqueue|fd|stdin|stdout|stderr|init|core) ;;
    *) hit=0; echo "UNEXPECTED $d";;
  esac
done
exit $hit
"""

_OPEN_HOST_DEVICES = _any_of(
    "head -c 1 /dev/vda > /dev/null",
    "head -c 1 /dev/sda > /dev/null",
    "head -c 1 /dev/mem > /dev/null",
    "head -c 1 /dev/kmem > /dev/null",
    "head -c 1 /dev/port > /dev/null",
    "timeout 1 head -c 1 /dev/kmsg > /dev/null",
    "test -c /dev/kmsg && echo x > /dev/kmsg",
)

_FOREIGN_FDS = r"""
hit=1
for l in /proc/[0-9]*/fd/* /proc/[0-9]*/cwd /proc/[0-9]*/root; do
  t=$(readlink "$l" 2>/dev/null) || continue
  case "$t" in
    pipe:*|socket:*|anon_inode:*) continue;;
  esac
  if [ ! -e "$t" ]; then hit=0; echo "FOREIGN $l -> $t"; fi
done
exit $hit
"""


# Searches whose pattern must not sit in any command line (the probe's own shell
# and grep would match themselves): the pattern travels base64-encoded.
def _grep_procs_for(variable: str) -> str:
    return (
        f"echo '{{{variable}_b64}}' | base64 -d > /tmp/.pattern\n"
        "for p in /proc/[0-9]*; do\n"
        '  [ "$p" = /proc/$$ ] && continue\n'
        '  if tr "\\0" "\\n" < "$p/cmdline" 2>/dev/null | grep -q -F -f /tmp/.pattern ||\n'
        '     tr "\\0" "\\n" < "$p/environ" 2>/dev/null | grep -q -F -f /tmp/.pattern; then\n'
        '    echo "FOUND in $p"; exit 0\n'
        "  fi\n"
        "done\n"
        "exit 1"
    )


_EXE_RACE = r"""
end=$(( $(date +%s) + {race_seconds} ))
: > /tmp/exe-race.log
(
  while [ "$(date +%s)" -lt "$end" ]; do
    for p in /proc/[0-9]*; do
      t=$(readlink "$p/exe" 2>/dev/null)
      case "$t" in
        */busybox) continue;;
      esac
      echo "SEEN $p exe=$t $(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" >> /tmp/exe-race.log
      if (printf '' >> "$p/exe") 2>/dev/null; then
        echo "OPENED-FOR-WRITE $p $t" >> /tmp/exe-race.log
      fi
      for f in "$p"/fd/*; do
        l=$(readlink "$f" 2>/dev/null) || continue
        case "$l" in pipe:*|socket:*|anon_inode:*|/dev/null) continue;; esac
        [ -e "$l" ] || echo "FOREIGN-FD $f -> $l" >> /tmp/exe-race.log
      done
    done
  done
  echo DONE >> /tmp/exe-race.log
) > /dev/null 2>&1 &
echo started
"""

_EXE_RACE_RESULT = r"""
while ! grep -q DONE /tmp/exe-race.log; do sleep 0.2; done
sort -u /tmp/exe-race.log | head -n 40
grep -q -e OPENED -e FOREIGN /tmp/exe-race.log
"""

# Hold sleepers past the limit (a shell dies when it cannot fork, so the loop runs
# in a subshell and the waiting uses builtins only), killed once counted so a slow
# machine cannot see them end before the limit is reached; then a real fork bomb.
_FORK_BOMB = r"""
rm -f /tmp/f /tmp/holders; mkfifo /tmp/f; exec 4<>/tmp/f
( i=0; while [ $i -lt {hold_count} ]; do
    sleep {hold_seconds} & echo $! >> /tmp/holders; i=$((i+1)); done ) \
  > /dev/null 2> /tmp/fork.err
set -- /proc/[0-9]*; n=$#
echo "holding: $n processes inside (limit {pids_limit})"
while read p; do kill $p; done < /tmp/holders 2> /dev/null
while :; do set -- /proc/[0-9]*; [ $# -lt 16 ] && break; read -t 0.2 x <&4; done
sort -u /tmp/fork.err | head -n 3
( b() {{ b | b & }}; b ) > /dev/null 2>&1 &
read -t {bomb_seconds} x <&4
set -- /proc/[0-9]*; echo "fork bomb: $# processes inside"
[ "$n" -gt {pids_limit} ]
"""

ATTACKS: tuple[Attack, ...] = (
    # -- kernel tunables and kernel memory
    Attack(
        "write_core_pattern",
        "echo '|/tmp/pwn %p' > /proc/sys/kernel/core_pattern",
        says=r"Read-only file system|Permission denied",
        unchanged=("core_pattern",),
    ),
    Attack(
        "write_every_proc_sys_file",
        _PROC_SYS_ALL,
        never=("WROTE",),
        unchanged=("sysctl_fingerprint",),
        doc="writes each file's own value back, so a hole would not hurt the host",
    ),
    Attack("write_sysfs", _SYS_WRITE, never=("WROTE",)),
    Attack(
        "read_kcore_kmsg_keys",
        _READ_BYTES.replace(
            "{files}",
            "/proc/kcore /proc/kmsg /proc/keys /proc/timer_list /proc/sched_debug "
            "/proc/latency_stats /proc/sysrq-trigger /sys/kernel/debug/* /sys/firmware/*/*",
        ),
        doc="masked paths read as empty; this kernel has no /proc/kcore at all",
    ),
    Attack(
        "list_sys_firmware_and_debug",
        "for d in /sys/firmware /sys/kernel/debug /sys/kernel/security; do ls -A $d; done"
        " | grep -q .",
    ),
    Attack("dmesg", "dmesg | head -n 3 | grep -q ."),
    Attack(
        "sysrq_trigger",
        ": >> /proc/sysrq-trigger",
        doc="opens for append only (never writes a key), so a hole would not crash the host",
    ),
    # -- mounts and namespaces
    Attack(
        "mount_tmpfs",
        "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m",
        says=r"[Pp]ermission denied|not permitted",
    ),
    Attack("mount_proc", "mkdir -p /tmp/p && mount -t proc proc /tmp/p"),
    Attack("mount_sysfs", "mkdir -p /tmp/s && mount -t sysfs sysfs /tmp/s"),
    Attack(
        "mount_cgroup_release_agent",
        "mkdir -p /tmp/c && mount -t cgroup -o memory cgroup /tmp/c && ls /tmp/c/release_agent",
        doc="CVE-2022-0492 needs a cgroup v1 mount",
    ),
    Attack("mount_bind_root", "mkdir -p /tmp/b && mount --bind / /tmp/b"),
    Attack(
        "mount_host_disk",
        "mkdir -p /tmp/d && mount -o ro /devices/disk /tmp/d",
        needs=("image_devices",),
    ),
    Attack(
        "remount_root_rw",
        "mount -o remount,rw / && touch /remounted",
        where=ONLY_INSTANCE,
        unchanged=("layer",),
    ),
    Attack("remount_proc_sys_rw", "mount -o remount,rw /proc/sys"),
    Attack(
        "unmount_masked_paths",
        _any_of(
            "umount /proc/keys",
            "umount /proc/sys",
            "umount -l /proc/kmsg",
            "umount /sys/firmware",
        ),
    ),
    Attack("unshare_user", "unshare -U -r id", says=r"not permitted"),
    Attack("unshare_mount", "unshare -m true"),
    Attack("unshare_net", "unshare -n true"),
    Attack(
        "unshare_pid_ipc_uts",
        _any_of("unshare -p -f true", "unshare -i true", "unshare -u true"),
        says=r"Operation not permitted",
        doc="busybox unshare has no -C: cgroup namespaces go untested (same unshare(2) filter)",
    ),
    Attack("nsenter_pid1", "nsenter -t 1 -m -u -i -n -p true"),
    Attack("setns_via_proc_ns", "nsenter --mount=/proc/1/ns/mnt --net=/proc/1/ns/net true"),
    Attack(
        "chroot_escape",
        "chroot / /bin/sh -c 'cd ../../../..; test -e {host_marker_path}'",
        doc="a chroot inside stays under the pivoted root",
    ),
    # -- kernel modules, devices
    Attack(
        "load_kernel_module",
        _any_of(
            "echo x > /tmp/x.ko && insmod /tmp/x.ko",
            "modprobe -q dummy",
            "rmmod $(cut -d' ' -f1 /proc/modules | head -n 1)",
        ),
        says=r"can't insert '/tmp/x.ko': Operation not permitted",
        unchanged=("modules",),
        doc="seccomp answers EPERM before the kernel looks (this kernel has no modules)",
    ),
    Attack(
        "mknod_devices",
        _any_of(
            "mknod /tmp/sda b 8 0",
            "mknod /tmp/mem c 1 1",
            "mknod /dev/kmsg2 c 1 11",
            "mknod /run/vda b 254 0",
        ),
        doc="bake steps keep CAP_MKNOD; the kernel still refuses devices in a user namespace",
    ),
    Attack("open_host_devices", _OPEN_HOST_DEVICES),
    Attack("host_devices_in_dev", _DEVICES_IN_DEV),
    Attack(
        "open_device_nodes_in_image",
        _any_of(
            "head -c 1 /devices/disk > /dev/null",
            "head -c 1 /devices/mem > /dev/null",
            "echo x > /devices/kmsg",
        ),
        needs=("image_devices",),
        says=r"not permitted|Permission denied",
        doc="the device cgroup must refuse nodes a malicious image carries",
    ),
    # -- the host's files and processes
    Attack(
        "read_host_files_through_proc",
        _any_of(
            "cat /proc/1/root{host_marker_path}",
            "cat /proc/self/root/../../..{host_marker_path}",
            "cat /proc/self/cwd/../../../..{host_marker_path}",
            "cat {host_marker_path}",
            "cat /proc/1/root/etc/shadow",
            "cat /etc/shadow",
        ),
        never=("{host_marker}", "{host_shadow_line}"),
    ),
    Attack(
        "find_host_marker",
        "find / \\( -path /proc -o -path /sys \\) -prune -o -name '{host_marker_name}' -print"
        " | grep -q .",
    ),
    Attack(
        "write_host_exe_runc_tini",
        _any_of(
            "printf '' >> /proc/self/exe",
            "printf '' >> /proc/1/exe",
            "printf '' >> /dev/init",
        ),
        unchanged=("runc_binary", "init_binary", "layer"),
        where=ONLY_INSTANCE,
    ),
    Attack(
        "leaked_host_fds",
        _FOREIGN_FDS,
        never=("FOREIGN",),
        doc="CVE-2024-21626 class: a descriptor or cwd naming a path that is not inside",
    ),
    Attack(
        "host_paths_in_proc",
        _grep_procs_for("home"),
        doc="no host path of the home (KILN_HOME) in any environment or command line inside",
    ),
    Attack("see_host_process", _grep_procs_for("host_sleep_marker")),
    Attack(
        "signal_host_process",
        _any_of("kill -0 {host_pid}", "kill -9 {host_pid}", "kill -STOP {host_pid}"),
        unchanged=("host_sleep_alive",),
    ),
    Attack(
        "ptrace_host_process_via_proc",
        _any_of(
            "head -c 1 /proc/{host_pid}/mem > /dev/null",
            "cat /proc/{host_pid}/environ | grep -q .",
            "readlink /proc/{host_pid}/exe",
            "ls /proc/{host_pid}/root/ | grep -q .",
        ),
        unchanged=("host_sleep_alive",),
        doc="busybox has no ptrace tool; /proc/<pid>/mem and friends pass the ptrace access check",
    ),
    Attack(
        "kill_all",
        "kill -9 -1; sleep 1; exit 1",
        unchanged=("host_sleep_alive", "other_sandbox_alive"),
        sandbox="own",
        doc="kill(-1) must reach nothing outside the sandbox",
    ),
    # -- privileges
    Attack(
        "setuid_root_binary",
        "me=$(id -u); rm -f /tmp/pw; mkfifo /tmp/pw\n"
        "/suid/su root < /tmp/pw > /dev/null 2> /tmp/su.err & p=$!\n"
        "exec 3> /tmp/pw; sleep 0.5\n"
        "e=$(awk '/^Uid/{{print $3}}' /proc/$p/status 2>/dev/null); kill $p 2>/dev/null\n"
        "cat /tmp/su.err\n"
        'echo "uid $me, euid of setuid-root su waiting for a password: ${{e:-gone}}"\n'
        '[ -n "$e" ] && [ "$e" != "$me" ]',
        says=r"must be suid to work properly|can't set groups|password: \d+",
        doc="no_new_privileges: a setuid-root binary keeps the caller's euid "
        "(busybox su keeps its euid while it waits for a password on a fifo)",
    ),
    Attack("raise_rlimit", "h=$(ulimit -Hn); ulimit -Hn $((h + 1)) && echo raised $h"),
    Attack(
        "escape_the_oom_killer_or_raise_priority",
        _any_of(
            "echo -1000 > /proc/self/oom_score_adj",
            "renice -n -20 -p $$",
            "ionice -c 1 -n 0 true",
        ),
        doc="an unkillable or real-time sandbox would starve the host (CAP_SYS_RESOURCE/NICE)",
    ),
    Attack("change_hostname", "hostname pwned", unchanged=("hostname",)),
    Attack(
        "set_clock",
        "date -s '2001-02-03 04:05:06' > /dev/null; [ \"$(date +%Y)\" = 2001 ]",
        says=r"not permitted",
        unchanged=("clock",),
    ),
    Attack(
        "reboot",
        "reboot -f; sleep 1; exit 1",
        sandbox="own",
        unchanged=("other_sandbox_alive",),
    ),
    Attack(
        "spoof_address",
        _any_of(
            "ip addr add {other_address}/24 dev eth0",
            "ip link set eth0 address 02:00:00:00:00:01",
            "ip route add 10.99.0.0/16 dev eth0",
            "arping -c 1 -w 1 -U -I eth0 {other_address}",
        ),
        where=ONLY_INSTANCE,
    ),
    Attack(
        "raw_socket",
        "traceroute -I -n -m 1 -w 1 127.0.0.1",
        where=ONLY_INSTANCE,
        doc="no CAP_NET_RAW (bake steps keep it, inside their own network namespace)",
    ),
    # -- the image's root tree and volumes
    Attack(
        "write_image_root",
        _any_of(
            "echo x > /bin/x",
            "echo x >> /etc/passwd",
            "rm /bin/true",
            "mkdir /newdir",
            "chmod 777 /bin",
            "touch /www/index.html",
            "ln -s / /escape",
        ),
        unchanged=("layer",),
        where=ONLY_INSTANCE,
    ),
    Attack(
        "volume_chown_host_file",
        _any_of(
            "chown 0:0 {volume}/hostfile",
            "chown 65534:65534 {volume}/hostfile",
            "chmod 4777 {volume}/hostfile",
            "echo x >> {volume}/hostfile",
            "touch -d '2001-01-01' {volume}/hostfile",
        ),
        unchanged=("volume_hostfile",),
        where=ONLY_INSTANCE,
    ),
    Attack(
        "volume_plant_setuid_or_device",
        "cp /bin/busybox {volume}/sbb && chmod 4755 {volume}/sbb; chown 0:0 {volume}/sbb\n"
        "ln -s /etc/shadow {volume}/shadow-link; cat {volume}/shadow-link\n"
        + _any_of("mknod {volume}/sda b 8 0", "ln {volume}/hostfile {volume}/hostfile-link"),
        unchanged=("volume_hostfile", "volume_foreign"),
        where=ONLY_INSTANCE,
        doc="what lands in a volume is owned by the home's range: no setuid-root, no devices",
    ),
    # -- other instances, the agent, the host's network
    Attack(
        "read_other_instance_secrets",
        "cat /proc/[0-9]*/root/run/secrets/* /run/secrets/* 2>/dev/null\n"
        "find / \\( -path /proc -o -path /sys \\) -prune -o -name '{other_secret_name}' -print"
        " -exec cat {{}} \\;\n"
        "ls /run/kiln {home} 2>&1\n"
        "exit 1",
        never=("{other_secret}",),
        where=ONLY_INSTANCE,
    ),
    Attack(
        "read_other_instance_logs",
        "ls {home}/logs 2>&1; cat {home}/logs/*/* 2>/dev/null\n"
        "find / \\( -path /proc -o -path /sys \\) -prune -o -type f -name '*.log' -print"
        " -exec cat {{}} \\;\n"
        "exit 1",
        never=("{other_log_marker}",),
        where=ONLY_INSTANCE,
    ),
    Attack(
        "reach_other_instance_directly",
        "nc -w 2 {other_address} {other_port} < /dev/null | grep -q .",
        never=("{other_banner}",),
        where=ONLY_INSTANCE,
    ),
    Attack(
        "connect_agent_socket",
        _any_of(
            "test -S {home}/agent.sock",
            "find / \\( -path /proc -o -path /sys \\) -prune -o -name agent.sock -print"
            " | grep -q .",
            "grep -q -F '@{abstract_socket}' /proc/net/unix",
        ),
        doc="the agent's socket is a path under KILN_HOME; abstract sockets belong to a netns",
    ),
    Attack(
        "connect_host_loopback",
        "nc -w 2 127.0.0.1 {loopback_port} < /dev/null\n"
        "nc -w 2 {gateway} {loopback_port} < /dev/null",
        never=("{loopback_banner}",),
        unchanged=("loopback_accepts",),
    ),
    Attack(
        "connect_host_unpublished_port",
        "nc -w 2 {gateway} {any_port} < /dev/null",
        never=("{any_banner}",),
        unchanged=("any_accepts",),
    ),
    Attack(
        "connect_host_other_addresses",
        'for a in {host_addresses}; do echo "try $a"; nc -w 2 $a {any_port} < /dev/null; done',
        never=("{any_banner}",),
        unchanged=("any_accepts",),
    ),
    Attack(
        "udp_to_the_host",
        "for a in {gateway} 127.0.0.1 {host_addresses}; do"
        " timeout 1 tftp -g -r probe -l /tmp/tftp $a {udp_port}; done; exit 1",
        unchanged=("udp_datagrams",),
        doc="only TCP to published ports is let through; busybox's UDP sender is tftp",
    ),
    Attack(
        "bind_host_port",
        "(nc -l -p {bind_port} > /dev/null 2>&1 &); sleep 0.5; netstat -ltn | grep ':{bind_port} '"
        "; exit 1",
        unchanged=("host_listener_on_bind_port",),
        doc="a listener inside never shows up among the host's listeners",
    ),
    # -- resources
    Attack(
        "fill_tmp",
        "dd if=/dev/zero of=/tmp/fill bs=1M count={tmp_fill_mb} 2>&1; rc=$?; "
        "ls -l /tmp/fill; rm -f /tmp/fill; exit $rc",
        says=r"No space left on device",
        where=ONLY_INSTANCE,
    ),
    Attack(
        "flood_the_log",
        "head -c {flood_bytes} /dev/zero | tr '\\0' 'A' >&9; echo flooded; exit 1",
        unchanged=("shim_alive",),
        bounded=(
            ("shim_peak_rss_mb", "{shim_rss_limit_mb}"),
            ("instance_log_growth_mb", "{log_growth_limit_mb}"),
        ),
        where=ONLY_INSTANCE,
        timeout=120.0,
        doc="the shim caps a line at 64 KiB; its memory must not follow the line",
    ),
    Attack(
        "fork_bomb",
        _FORK_BOMB,
        says=r"can't fork",
        sandbox="pids",
        bounded=(
            ("sandbox_pids_peak", "{pids_limit}"),
            ("host_process_rise", "{host_process_rise_limit}"),
        ),
        timeout=90.0,
        doc="the sandbox's pids cgroup never passes its limit, the host's count barely moves "
        "and the host stays responsive",
    ),
    Attack(
        "memory_hog",
        "dd if=/dev/zero of=/dev/null bs={hog_mb}M count=1",
        sandbox="memory",
        bounded=(("memory_peak_mb", "{memory_limit_mb}"),),
        timeout=60.0,
    ),
    Attack(
        "exec_race_proc_exe",
        _EXE_RACE,
        action="exec_during",
        then=_EXE_RACE_RESULT,
        never=("OPENED", "FOREIGN-FD"),
        unchanged=("runc_binary",),
        where=ONLY_INSTANCE,
        doc="CVE-2019-5736: the runc of a `runc exec` must not be writable from inside, "
        "nor its descriptors (CVE-2024-21626) readable",
    ),
    # -- bake steps only
    Attack(
        "write_outside_staged_root",
        "for path in /../../../{host_marker_name}.escaped"
        " /proc/1/root/../{host_marker_name}.escaped"
        " /proc/self/cwd/../../../../{host_marker_name}.escaped"
        " /proc/1/cwd/../../../{host_marker_name}.escaped; do echo x > $path; done\n"
        "ln -s / /tmp/up && echo x > /tmp/up/../../{host_marker_name}.escaped\n"
        "ls -d /{host_marker_name}.escaped\n"
        "test -e {host_marker_path}",
        unchanged=("staging_siblings",),
        where=ONLY_STEP,
        doc="every way up from / lands in the staged root itself: the host's tree, the "
        "staging dir around the root and / of the host stay as they were",
    ),
    Attack(
        "leave_host_owned_or_device_entries",
        "cp /bin/busybox /sbb && chmod 4755 /sbb && chown 0:0 /sbb\n"
        + _any_of("mknod /sda b 8 0", "mknod /mem c 1 1", "chown 4294967294 /bin/busybox"),
        unchanged=("foreign_entries",),
        where=ONLY_STEP,
        doc="whatever a step does, the staged root holds only the home's ids and no devices",
    ),
)

# -- attacks carried by the image or the spec rather than by a command

# A malicious image's WORKDIR (or a recipe's ``workdir``): CVE-2024-21626 gave a
# process started with its cwd on a descriptor runc leaked (/proc/self/fd/N) a
# cwd on the host, from which ``cd ..`` walks out of the container's root.
MALICIOUS_WORKDIRS = (*(f"/proc/self/fd/{n}" for n in range(3, 10)), "/proc/1/cwd")

# Run with such a cwd: exits 0 (and prints ESCAPED) only if it reaches the host marker.
WORKDIR_ESCAPE = (
    "pwd; for i in 1 2 3 4 5 6 7 8 9 10; do cd -P .. 2>/dev/null; done; pwd -P; "
    "if test -e .{host_marker_path}; then echo ESCAPED; cat .{host_marker_path}; exit 0; fi; "
    "exit 1"
)

# Extra top layers of a malicious image: a mount point (or a volume target) made a
# symlink, so that runc would mount onto what it points at (CVE-2019-19921 and kin).
IMAGE_TRICKS: dict[str, dict[str, str]] = {
    "proc_is_a_symlink": {"proc": "/tmp"},
    "sys_is_a_symlink": {"sys": "/tmp"},
    "dev_is_a_symlink": {"dev": "/tmp"},
    "tmp_is_a_symlink_into_proc_sys": {"tmp": "/proc/sys/kernel"},
    "run_is_a_symlink_into_proc": {"run": "/proc/sys"},
    "volume_target_is_a_symlink_into_proc": {"data": "/proc/sys/kernel"},
    "secrets_target_is_a_symlink_out": {"run": "/proc/1/root"},
}

# What every sandbox started from a tricked image must still refuse.
AFTER_IMAGE_TRICK = (
    "write_core_pattern",
    "write_every_proc_sys_file",
    "read_kcore_kmsg_keys",
    "list_sys_firmware_and_debug",
    "read_host_files_through_proc",
)


def build_trick_layer(dest: Path, links: Mapping[str, str], uid: int, gid: int) -> Path:
    """One extra image layer holding ``links`` (name → symlink target) at its root."""
    dest.mkdir(mode=0o755)
    for name, target in links.items():
        (dest / name).symlink_to(target)
    for path in [dest, *dest.iterdir()]:
        os.lchown(path, uid, gid)
    return dest


def attack_named(name: str) -> Attack:
    return next(a for a in ATTACKS if a.name == name)


NAMES = [a.name for a in ATTACKS]
assert len(NAMES) == len(set(NAMES)), "attack names must be unique"


def execute(attack: Attack, host: Host, send: Callable[[str, float], Outcome]) -> Outcome:
    """Run one attack through ``send`` (command, timeout → outcome) and judge it."""
    before = host.observe(attack)
    finishers = {name: host.monitors[name]() for name, _ in attack.bounded}
    outcome = send(attack.render(host.variables), attack.timeout)
    if attack.action is not None:
        host.actions[attack.action]()
    then = attack.render_then(host.variables)
    if then is not None:
        outcome = send(then, attack.timeout)
    measured = {name: finish() for name, finish in finishers.items()}
    after = host.observe(attack)
    judge(attack, outcome, host, before, after, measured)
    return dataclasses.replace(outcome, measured=measured)
