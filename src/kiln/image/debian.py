"""Debian bases built with mmdebstrap, pinned by ``kiln.lock``.

The first bake of a ``debian:SUITE`` base asks apt for the newest packages
and records the exact version of everything installed in ``kiln.lock``
beside ``kiln.toml``. Every later bake installs exactly that set and checks
afterwards that dpkg agrees, so a base changes only when someone runs
``kiln bake --update-lock`` and commits the new lock.

The output is made byte-reproducible for a given package set: mmdebstrap
honours ``SOURCE_DATE_EPOCH``, host-specific files (resolv.conf, hostname)
are removed, ``/dev`` is left out (an image's /dev comes from its runtime)
and apt's auto-installed marks are rewritten in a fixed order.

mmdebstrap writes a directory, not a tarball: the bake turns that tree into
the base layer and then keeps it as the root filesystem of the first ``run``
step, so a cold bake never packs, re-reads and unpacks the base again.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import KilnError
from kiln.image.sandbox import stream_command

DEBIAN_MIRROR = "http://deb.debian.org/debian"
LOCK_NAME = "kiln.lock"
VARIANT = "minbase"
# Merged-/usr the way debootstrap and Debian's own container images do it (symlinks and
# the usr-is-merged package) instead of apt's first choice, usrmerge, which drags perl
# and its modules (≈50 MB, 4 s of dpkg) into every base.
MERGED_USR_HOOKS = "/usr/share/mmdebstrap/hooks/maybe-merged-usr"
# mmdebstrap --mode=root mounts /proc, /sys and /dev into the tree it builds, which now
# lies in the bake's staging dir. In a private mount namespace those mounts die with
# mmdebstrap however it ends, so removing a killed bake's staging dir never reaches
# into the host's /sys or /dev.
MOUNT_NAMESPACE = ("unshare", "--mount", "--propagation", "private", "--")

_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]*$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$")
_DEBIAN_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "armhf",
    "i686": "i386",
    "i386": "i386",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host_architecture() -> str:
    machine = platform.machine()
    try:
        return _DEBIAN_ARCH[machine]
    except KeyError:
        raise KilnError(f"no Debian architecture known for this machine ({machine})") from None


@dataclass(frozen=True)
class DebianBase:
    """What a recipe asks for: a suite, an architecture and extra packages."""

    suite: str
    architecture: str
    packages: tuple[str, ...]

    @property
    def lock_key(self) -> str:
        """The table name in kiln.lock: two recipes with the same request share it."""
        key = f"debian:{self.suite}/{self.architecture}"
        return key + ("+" + ",".join(self.packages) if self.packages else "")


def parse_debian_base(
    source: str, packages: Sequence[str], where: str, architecture: str | None = None
) -> DebianBase:
    suite = source.removeprefix("debian:")
    if not _SUITE_RE.match(suite):
        raise KilnError(f"{where}.from: {source!r} is not debian:SUITE (e.g. debian:bookworm)")
    for index, name in enumerate(packages):
        if not _PACKAGE_RE.match(name):
            raise KilnError(f"{where}.packages[{index}]: {name!r} is not a Debian package name")
    return DebianBase(suite, architecture or host_architecture(), tuple(sorted(set(packages))))


@dataclass(frozen=True)
class LockEntry:
    suite: str
    architecture: str
    requested: tuple[str, ...]
    packages: Mapping[str, str] = field(default_factory=dict)


def read_lock(path: Path) -> dict[str, LockEntry]:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise KilnError(f"{path}: cannot read the lock file: {e}") from e
    entries: dict[str, LockEntry] = {}
    for key, table in data.items():
        if not isinstance(table, dict) or not isinstance(table.get("packages"), dict):
            raise KilnError(f"{path}: [{key}] needs suite, architecture and packages")
        entries[key] = LockEntry(
            suite=str(table.get("suite", "")),
            architecture=str(table.get("architecture", "")),
            requested=tuple(str(p) for p in table.get("requested", [])),
            packages={str(k): str(v) for k, v in table["packages"].items()},
        )
    return entries


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_lock(entries: Mapping[str, LockEntry]) -> str:
    lines = [
        "# kiln.lock: exact Debian package versions of each base, written by `kiln bake`.",
        "# Commit it. `kiln bake --update-lock` re-resolves to the mirror's newest versions.",
    ]
    for key in sorted(entries):
        entry = entries[key]
        requested = ", ".join(_toml_string(p) for p in entry.requested)
        lines += [
            "",
            f"[{_toml_string(key)}]",
            f"suite = {_toml_string(entry.suite)}",
            f"architecture = {_toml_string(entry.architecture)}",
            f"requested = [{requested}]",
            "",
            f"[{_toml_string(key)}.packages]",
        ]
        lines += [
            f"{_toml_string(name)} = {_toml_string(entry.packages[name])}"
            for name in sorted(entry.packages)
        ]
    return "\n".join(lines) + "\n"


def write_lock(path: Path, entries: Mapping[str, LockEntry]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render_lock(entries))
    os.replace(tmp, path)


def parse_dpkg_versions(text: str) -> dict[str, str]:
    """``dpkg-query -W -f='${Package}\\t${Version}\\n'`` output → {package: version}."""
    versions: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, version = line.partition("\t")
        versions[name.strip()] = version.strip()
    return versions


def verify_installed(installed: Mapping[str, str], locked: Mapping[str, str], where: str) -> None:
    """The lock is the truth: anything apt installed differently is an error, never a warning."""
    for name in sorted(set(locked) | set(installed)):
        want, got = locked.get(name), installed.get(name)
        if want == got:
            continue
        if want is None:
            detail = f"{name} {got} was installed but is not in kiln.lock"
        elif got is None:
            detail = f"{name} {want} is in kiln.lock but was not installed"
        else:
            detail = f"{name} is {got}, kiln.lock says {want}"
        raise KilnError(
            f"{where}: {detail}; the mirror no longer matches the lock — "
            "run `kiln bake --update-lock` to re-resolve"
        )


def uses_merged_usr_hook(locked: Mapping[str, str] | None) -> bool:
    """A lock made with usrmerge keeps building exactly as it was resolved."""
    return not locked or "usrmerge" not in locked


def mmdebstrap_argv(
    base: DebianBase,
    *,
    output: Path,
    versions_out: Path,
    deb_cache: Path,
    locked: Mapping[str, str] | None = None,
    mirror: str = DEBIAN_MIRROR,
) -> list[str]:
    """The mmdebstrap command for ``base``; with ``locked`` every package is pinned.

    ``output`` is the directory mmdebstrap builds the tree in (absent or empty).
    """
    if locked:
        include = [f"{name}={locked[name]}" for name in sorted(locked)]
    else:
        include = list(base.packages)
    cache = shlex.quote(str(deb_cache))
    mark_manual = " ".join(shlex.quote(p) for p in base.packages)
    marks = 'chroot "$1" sh -c ' + shlex.quote(
        "dpkg-query -W -f='${Package}\\n' | xargs apt-mark auto >/dev/null"
        + (f" && apt-mark manual {mark_manual} >/dev/null" if mark_manual else "")
    )
    states = '"$1"/var/lib/apt/extended_states'
    argv = [
        *MOUNT_NAMESPACE,
        "mmdebstrap",
        "--mode=root",
        f"--variant={VARIANT}",
        "--format=directory",
        f"--architectures={base.architecture}",
        "--skip=essential/unlink,output/dev",
    ]
    if uses_merged_usr_hook(locked):
        argv.append(f"--hook-dir={MERGED_USR_HOOKS}")
    if include:
        argv.append("--include=" + ",".join(include))
    argv += [
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
        f"--setup-hook=sync-in {cache} /var/cache/apt/archives",
        f"--customize-hook=sync-out /var/cache/apt/archives {cache}",
        f"--customize-hook={marks}",
        f"--customize-hook=if [ -f {states} ]; then perl -00 -e 'print sort <>' "
        f"< {states} > {states}.sorted && mv {states}.sorted {states}; fi",
        "--customize-hook=chroot \"$1\" dpkg-query -W -f='${Package}\\t${Version}\\n' > "
        + shlex.quote(str(versions_out)),
        '--customize-hook=rm -f "$1"/etc/resolv.conf "$1"/etc/hostname',
        base.suite,
        str(output),
        mirror,
    ]
    return argv


def finish_tree(root: Path, epoch: int) -> None:
    """Make mmdebstrap's directory exactly what unpacking its layer gives.

    That is the tree ``--format=tar`` packed (everything but ``/dev``, mtimes
    clamped to ``epoch``), minus what a layer cannot carry (device nodes,
    sockets, xattrs). Both the base layer and the first ``run`` step's root
    filesystem are then this one tree, so they cannot disagree.
    """
    from kiln.image.layer import settle_tree

    dev = root / "dev"
    if dev.is_dir() and not dev.is_symlink():
        shutil.rmtree(dev)
    settle_tree(root, epoch)


def mmdebstrap_env(epoch: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env.update({"SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8"})
    return env


def run_mmdebstrap(
    argv: Sequence[str], epoch: int, on_line: Callable[[str], None], where: str
) -> None:
    if os.geteuid() != 0:
        raise KilnError(f"{where}: building a Debian base with mmdebstrap needs root")
    if shutil.which("mmdebstrap") is None:
        raise KilnError(f"{where}: cannot run mmdebstrap: not found (apt-get install mmdebstrap)")
    try:
        code, tail = stream_command(argv, on_line, env=mmdebstrap_env(epoch))
    except OSError as e:
        raise KilnError(f"{where}: cannot run mmdebstrap: {e} (apt-get install mmdebstrap)") from e
    if code != 0:
        raise KilnError(f"{where}: mmdebstrap failed with exit {code}\n" + "\n".join(tail))
