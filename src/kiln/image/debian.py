"""Debian bases: a shared minimal tree made by mmdebstrap, packages installed over it.

A ``debian:SUITE`` recipe gets two layers, as an image ``FROM debian:SUITE``
with an ``apt-get install`` gets them from Docker: the suite's minimal base
(mmdebstrap ``--variant=minbase``, no recipe packages), which the machine keeps
once (:mod:`kiln.image.basecache`), and a layer with the recipe's ``packages``,
installed by apt over that tree from ``.deb`` files downloaded on the host.

The first bake asks apt for the newest packages and records the exact
version of everything installed in ``kiln.lock`` beside ``kiln.toml``: the
base's packages and the whole set. Every later bake installs exactly that and
checks afterwards that dpkg agrees, so a base changes only when someone runs
``kiln bake --update-lock`` and commits the new lock.

The output is byte-reproducible for a given package set: mmdebstrap honours
``SOURCE_DATE_EPOCH``, host-specific files (resolv.conf, hostname) and logs
are removed, ``/dev`` is left out (an image's /dev comes from its runtime)
and apt's auto-installed marks are rewritten in a fixed order.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shlex
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import KilnError
from kiln.image.command import isolated
from kiln.image.digest import is_digest

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LOCK_NAME = "kiln.lock"
VARIANT = "minbase"
# Merged-/usr the way debootstrap and Debian's own container images do it (symlinks and
# the usr-is-merged package) instead of apt's first choice, usrmerge, which drags perl
# and its modules (≈50 MB, 4 s of dpkg) into every base.
MERGED_USR_HOOKS = "/usr/share/mmdebstrap/hooks/maybe-merged-usr"
CHROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# What mmdebstrap's cleanup removes to make a tree reproducible (cleanup/reproducible
# and cleanup/apt); the package install removes the same after apt ran.
UNREPRODUCIBLE_FILES = (
    "var/log/dpkg.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/alternatives.log",
    "var/cache/ldconfig/aux-cache",
    "var/log/apt/eipp.log.xz",
    "var/lib/dbus/machine-id",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
)
UNREPRODUCIBLE_DIRS = ("var/lib/apt/lists/auxfiles",)
POLICY_RC_D = "usr/sbin/policy-rc.d"
EXTENDED_STATES = "var/lib/apt/extended_states"
DPKG_STATUS = "var/lib/dpkg/status"

_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]*$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$")
_INST_RE = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) .*\[([^\]]+)\]\)")
_REMV_RE = re.compile(r"^Remv (\S+)")
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


# -- kiln.lock ----------------------------------------------------------------


@dataclass(frozen=True)
class LockEntry:
    """One base request's exact packages: the whole image's, and its minimal base's.

    ``base`` is None only in an entry written before bases were kept apart (a
    request with packages and no ``base`` table); for a request without
    packages the base is the whole set.
    """

    suite: str
    architecture: str
    requested: tuple[str, ...]
    packages: Mapping[str, str] = field(default_factory=dict)
    base: Mapping[str, str] | None = None

    def layer_packages(self) -> dict[str, str]:
        """What the packages layer installs over the base: new packages and new versions."""
        base = self.base or {}
        return {name: v for name, v in self.packages.items() if base.get(name) != v}


REGISTRY_PIN_PREFIX = "registry:"
"""kiln.lock tables named ``registry:HOST/REPO:TAG`` pin a registry base's tag to a digest."""


def read_registry_pins(path: Path) -> dict[str, str]:
    """``registry:HOST/REPO:TAG`` → the manifest digest a bake resolved the tag to."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise KilnError(f"{path}: cannot read the lock file: {e}") from e
    pins: dict[str, str] = {}
    for key, table in data.items():
        if not key.startswith(REGISTRY_PIN_PREFIX):
            continue
        digest = table.get("digest") if isinstance(table, dict) else None
        if not isinstance(digest, str) or not is_digest(digest):
            raise KilnError(f'{path}: ["{key}"] needs digest = "sha256:<64 hex digits>"')
        pins[key] = digest
    return pins


def read_lock(path: Path) -> dict[str, LockEntry]:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise KilnError(f"{path}: cannot read the lock file: {e}") from e
    entries: dict[str, LockEntry] = {}
    for key, table in data.items():
        if key.startswith(REGISTRY_PIN_PREFIX):
            continue
        if not isinstance(table, dict) or not isinstance(table.get("packages"), dict):
            raise KilnError(f"{path}: [{key}] needs suite, architecture and packages")
        packages = {str(k): str(v) for k, v in table["packages"].items()}
        requested = tuple(str(p) for p in table.get("requested", []))
        base_table = table.get("base")
        if base_table is not None and not isinstance(base_table, dict):
            raise KilnError(f"{path}: [{key}.base] must be a table of package versions")
        base: dict[str, str] | None
        if base_table is not None:
            base = {str(k): str(v) for k, v in base_table.items()}
        else:
            base = None if requested else dict(packages)
        entries[key] = LockEntry(
            suite=str(table.get("suite", "")),
            architecture=str(table.get("architecture", "")),
            requested=requested,
            packages=packages,
            base=base,
        )
    return entries


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _toml_table(name: str, versions: Mapping[str, str]) -> list[str]:
    return ["", f"[{name}]"] + [
        f"{_toml_string(package)} = {_toml_string(versions[package])}"
        for package in sorted(versions)
    ]


def render_lock(entries: Mapping[str, LockEntry], pins: Mapping[str, str] | None = None) -> str:
    lines = [
        "# kiln.lock: exact Debian package versions of each base, written by `kiln bake`.",
        "# [KEY.base] is the shared minimal base, [KEY.packages] the whole image;",
        '# ["registry:HOST/REPO:TAG"] the manifest digest a registry base\'s tag resolved to.',
        "# Commit it. `kiln bake --update-lock` re-resolves (newest versions, current tags).",
    ]
    for key in sorted(entries):
        entry = entries[key]
        name = _toml_string(key)
        requested = ", ".join(_toml_string(p) for p in entry.requested)
        lines += [
            "",
            f"[{name}]",
            f"suite = {_toml_string(entry.suite)}",
            f"architecture = {_toml_string(entry.architecture)}",
            f"requested = [{requested}]",
        ]
        if entry.requested and entry.base is not None:
            lines += _toml_table(f"{name}.base", entry.base)
        lines += _toml_table(f"{name}.packages", entry.packages)
    for key in sorted(pins or {}):
        lines += ["", f"[{_toml_string(key)}]", f"digest = {_toml_string((pins or {})[key])}"]
    return "\n".join(lines) + "\n"


def write_lock(
    path: Path, entries: Mapping[str, LockEntry], pins: Mapping[str, str] | None = None
) -> None:
    """Write the whole lock; ``pins`` None keeps the registry pins the file holds."""
    if pins is None:
        pins = read_registry_pins(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render_lock(entries, pins))
    os.replace(tmp, path)


# -- dpkg -----------------------------------------------------------------------


def parse_dpkg_versions(text: str) -> dict[str, str]:
    """``dpkg-query -W -f='${Package}\\t${Version}\\n'`` output → {package: version}."""
    versions: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, version = line.partition("\t")
        versions[name.strip()] = version.strip()
    return versions


def parse_dpkg_status(text: str) -> dict[str, str]:
    """A dpkg ``status`` file → {package: version} of what is installed."""
    versions: dict[str, str] = {}
    for paragraph in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        package, version = fields.get("Package"), fields.get("Version")
        if package and version and fields.get("Status", "").endswith(" installed"):
            versions[package] = version
    return versions


def installed_packages(root: Path) -> dict[str, str]:
    """What dpkg says is installed in the tree at ``root``."""
    try:
        return parse_dpkg_status((root / DPKG_STATUS).read_text())
    except OSError:
        return {}


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


# -- the minimal base: mmdebstrap -------------------------------------------------


def mmdebstrap_argv(
    suite: str,
    architecture: str,
    *,
    output: Path,
    deb_cache: Path,
    landing: Path,
    pins: Mapping[str, str] | None = None,
    merged_usr_hook: bool = True,
    mirror: str = DEBIAN_MIRROR,
) -> list[str]:
    """The mmdebstrap command for the minimal base of ``suite``; with ``pins`` every
    package is the pinned version.

    It reads the machine's ``deb_cache`` and writes what it downloaded into ``landing``,
    never into the cache: mmdebstrap's sync-out rewrites files in place, and another
    bake may be installing from the same file (:func:`keep_downloads` moves them in).

    ``output`` is the directory mmdebstrap builds the tree in (absent or
    empty). It runs in its own pid and mount namespaces (:func:`isolated`),
    so the ``/proc``, ``/sys`` and ``/dev`` it mounts into the tree and every
    process it starts vanish with it however it ends.
    """
    cache = shlex.quote(str(deb_cache))
    marks = 'chroot "$1" sh -c ' + shlex.quote(
        "dpkg-query -W -f='${Package}\\n' | xargs apt-mark auto >/dev/null"
    )
    states = f'"$1"/{EXTENDED_STATES}'
    argv = [
        "mmdebstrap",
        "--mode=root",
        f"--variant={VARIANT}",
        "--format=directory",
        f"--architectures={architecture}",
        "--skip=essential/unlink,output/dev",
    ]
    if merged_usr_hook:
        argv.append(f"--hook-dir={MERGED_USR_HOOKS}")
    if pins:
        argv.append("--include=" + ",".join(f"{name}={pins[name]}" for name in sorted(pins)))
    argv += [
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
        f"--setup-hook=sync-in {cache} /var/cache/apt/archives",
        f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(landing))}",
        f"--customize-hook={marks}",
        f"--customize-hook=if [ -f {states} ]; then perl -00 -e 'print sort <>' "
        f"< {states} > {states}.sorted && mv {states}.sorted {states}; fi",
        '--customize-hook=rm -f "$1"/etc/resolv.conf "$1"/etc/hostname',
        suite,
        str(output),
        mirror,
    ]
    return isolated(argv)


def landing_dir(deb_cache: Path) -> Path:
    """A new private directory beside ``deb_cache`` (the same file system, so a rename
    moves a file in at once) for one download: not inside it, where a concurrent
    mmdebstrap's sync-in would copy it into that base's tree."""
    landing = deb_cache.parent / f".debs-landing-{os.getpid()}-{secrets.token_hex(4)}"
    landing.mkdir(mode=0o700)
    return landing


def keep_downloads(landing: Path, deb_cache: Path) -> None:
    """Move each ``.deb`` of ``landing`` into ``deb_cache`` by rename (same file system),
    so a reader of the cache sees the whole file or none."""
    for deb in landing.glob("*.deb"):
        if deb.is_file() and not deb.is_symlink():
            os.replace(deb, deb_cache / deb.name)


def finish_tree(root: Path, epoch: int) -> None:
    """Make mmdebstrap's directory exactly what unpacking its layer gives.

    That is everything but ``/dev``, mtimes clamped to ``epoch``, minus what
    a layer cannot carry (device nodes, sockets, xattrs). The base layer, the
    shared tree and the snapshots copied from it are then one tree.
    """
    from kiln.image.layer import settle_tree

    dev = root / "dev"
    if dev.is_dir() and not dev.is_symlink():
        shutil.rmtree(dev)
    settle_tree(root, epoch)


def build_env(epoch: int, tmpdir: Path | None = None) -> dict[str, str]:
    """The environment of mmdebstrap and apt: the host's, minus its locale, plus the epoch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "APT_"))}
    env.update({"SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8"})
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def mmdebstrap_blocker() -> str | None:
    """Why mmdebstrap cannot build a base here, or None."""
    if os.geteuid() != 0:
        return "building a Debian base with mmdebstrap needs root"
    for tool, package in (("mmdebstrap", "mmdebstrap"), ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            return f"cannot run {tool}: not found (apt-get install {package})"
    return None


# -- the packages layer: apt on the host resolves and downloads, apt in the tree installs


def deb_file_name(name: str, version: str, architecture: str) -> str:
    """The name apt gives a downloaded ``.deb`` (an epoch's colon is ``%3a``)."""
    return f"{name}_{version.replace(':', '%3a')}_{architecture}.deb"


def find_deb(deb_cache: Path, name: str, version: str, architecture: str) -> Path | None:
    for arch in (architecture, "all"):
        path = deb_cache / deb_file_name(name, version, arch)
        if path.is_file():
            return path
    return None


def missing_debs(deb_cache: Path, packages: Mapping[str, str], architecture: str) -> dict[str, str]:
    return {
        name: version
        for name, version in packages.items()
        if find_deb(deb_cache, name, version, architecture) is None
    }


@dataclass(frozen=True)
class AptPlan:
    """What apt would do to install the requested packages over a base."""

    install: dict[str, str]
    remove: tuple[str, ...] = ()


def parse_apt_simulation(text: str) -> AptPlan:
    """``apt-get install -s`` output → the packages it installs (name → version) and removes."""
    install: dict[str, str] = {}
    remove: list[str] = []
    for line in text.splitlines():
        found = _INST_RE.match(line)
        if found:
            install[found.group(1).split(":")[0]] = found.group(2)
            continue
        gone = _REMV_RE.match(line)
        if gone:
            remove.append(gone.group(1).split(":")[0])
    return AptPlan(install, tuple(sorted(remove)))


class HostApt:
    """apt on the host, pointed at one suite and a base tree's dpkg status.

    It resolves what installing the recipe's packages over that base takes
    and downloads those ``.deb`` files into the shared download cache; it
    installs nothing on the host. Its package lists live in ``state`` (one
    directory per suite and architecture, shared by every home like the
    ``.deb`` files), so a re-resolution downloads only what changed.
    """

    def __init__(
        self,
        state: Path,
        deb_cache: Path,
        suite: str,
        architecture: str,
        mirror: str = DEBIAN_MIRROR,
    ) -> None:
        self.state = Path(state)
        self.deb_cache = Path(deb_cache)
        self.suite = suite
        self.architecture = architecture
        self.mirror = mirror

    def config(self, status: Path) -> Path:
        """Write the apt configuration (nothing of the host's /etc/apt) for ``status``."""
        if not DEBIAN_KEYRING.is_file():
            raise KilnError(f"{DEBIAN_KEYRING} is missing (apt-get install debian-archive-keyring)")
        etc = self.state / "etc"
        for directory in (
            self.state / "lists" / "partial",
            self.state / "cache",
            self.state / "log",
            etc / "apt.conf.d",
            etc / "preferences.d",
            etc / "sources.list.d",
            etc / "trusted.gpg.d",
            self.deb_cache / "partial",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        (etc / "sources.list").write_text(
            f"deb [signed-by={DEBIAN_KEYRING}] {self.mirror} {self.suite} main\n"
        )
        settings = {
            "APT::Architecture": self.architecture,
            "Dir": "/",
            "Dir::State": f"{self.state}/",
            "Dir::State::Lists": f"{self.state}/lists/",
            "Dir::State::status": str(status),
            "Dir::Cache": f"{self.state}/cache/",
            "Dir::Cache::archives": f"{self.deb_cache}/",
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "Dir::Etc": f"{etc}/",
            "Dir::Etc::SourceParts": f"{etc}/sources.list.d/",
            "Dir::Etc::Parts": f"{etc}/apt.conf.d/",
            "Dir::Etc::PreferencesParts": f"{etc}/preferences.d/",
            "Dir::Etc::TrustedParts": f"{etc}/trusted.gpg.d/",
            "Dir::Log": f"{self.state}/log/",
            "APT::Install-Recommends": "false",
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "Debug::NoLocking": "true",
        }
        text = "".join(f"{key} {_apt_string(value)};\n" for key, value in settings.items())
        text += f"APT::Architectures {{ {_apt_string(self.architecture)}; }};\n"
        path = self.state / "apt.conf"
        path.write_text(text)
        return path

    def env(self, status: Path, epoch: int) -> dict[str, str]:
        env = build_env(epoch)
        env["APT_CONFIG"] = str(self.config(status))
        return env

    def update_argv(self) -> list[str]:
        return ["apt-get", "-q", "update"]

    def simulate_argv(self, requested: Sequence[str]) -> list[str]:
        return ["apt-get", "-q", "-s", "install", *requested]

    def download_argv(self, packages: Mapping[str, str]) -> list[str]:
        return ["apt-get", "-q", "download", *(f"{n}={packages[n]}" for n in sorted(packages))]


def _apt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def install_argv(
    rootfs: Path,
    debs: Sequence[Path],
    deb_cache: Path,
    requested: Sequence[str],
) -> list[str]:
    """Install ``debs`` (files of ``deb_cache``) into ``rootfs`` with apt in a chroot.

    Runs in fresh pid, mount and network namespaces: a tmpfs ``/dev`` with the usual
    device nodes, ``/proc``, a read-only ``/sys``, a tmpfs ``/tmp`` holding the
    download cache read-only, none of them in the tree once it ends. Every new
    package is then marked auto-installed, the requested ones manual, as a
    fresh mmdebstrap would. No network: apt only reads the given files.
    """
    r = shlex.quote(str(rootfs))
    files = " ".join(shlex.quote(f"/tmp/debs/{path.name}") for path in debs)
    chroot = f'chroot "$r" /usr/bin/env -i PATH={CHROOT_PATH} ' + " ".join(
        (
            "DEBIAN_FRONTEND=noninteractive",
            "DEBCONF_NONINTERACTIVE_SEEN=true",
            "LC_ALL=C.UTF-8",
            "LANGUAGE=C.UTF-8",
            "LANG=C.UTF-8",
            '"SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"',
        )
    )
    apt_options = " ".join(
        (
            "-o APT::Sandbox::User=root",
            "-o APT::Install-Recommends=false",
            "-o Dir::Cache::pkgcache=",
            "-o Dir::Cache::srcpkgcache=",
            "-o Dpkg::Use-Pty=0",
            "-o Dpkg::Options::=--force-unsafe-io",
        )
    )
    manual = " ".join(shlex.quote(name) for name in requested)
    script = "\n".join(
        (
            "set -e",
            f"r={r}",
            'mount -t tmpfs -o mode=0755,nosuid tmpfs "$r/dev"',
            "for d in null zero full random urandom tty; do",
            '  : > "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"',
            "done",
            'mkdir "$r/dev/pts" "$r/dev/shm"',
            'mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$r/dev/pts"',
            'ln -s pts/ptmx "$r/dev/ptmx"; ln -s /proc/self/fd "$r/dev/fd"',
            'ln -s /proc/self/fd/0 "$r/dev/stdin"; ln -s /proc/self/fd/1 "$r/dev/stdout"',
            'ln -s /proc/self/fd/2 "$r/dev/stderr"',
            'mount -t proc proc "$r/proc"',
            'mount -t sysfs -o ro,nosuid,nodev,noexec sys "$r/sys"',
            'mount -t tmpfs -o mode=1777,nosuid tmpfs "$r/tmp"',
            'mkdir "$r/tmp/debs"',
            f'mount --bind -o ro {shlex.quote(str(deb_cache))} "$r/tmp/debs"',
            f"{chroot} apt-get -q -y {apt_options} install {files}",
            f"{chroot} sh -c "
            + shlex.quote(
                "dpkg-query -W -f='${Package}\\n' | xargs apt-mark auto >/dev/null"
                + (f" && apt-mark manual {manual} >/dev/null" if manual else "")
            ),
        )
    )
    return isolated(["sh", "-c", script], network=False)


def prepare_install(rootfs: Path) -> list[Path]:
    """What the install needs in the tree before it is looked at: a ``/dev`` mount point
    and a ``policy-rc.d`` that keeps maintainer scripts from starting services.

    Made before the layer's "before" view and removed after its "after" view,
    so neither is ever part of the layer. Returns what to remove.
    """
    made: list[Path] = []
    dev = rootfs / "dev"
    if not os.path.lexists(dev):
        dev.mkdir(mode=0o755)
        made.append(dev)
    policy = rootfs / POLICY_RC_D
    if not os.path.lexists(policy) and policy.parent.is_dir():
        policy.write_text("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
        made.append(policy)
    return made


def undo_prepare(made: Sequence[Path]) -> None:
    for path in reversed(made):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def clean_after_install(rootfs: Path) -> None:
    """Remove what apt and dpkg leave that depends on the time (mmdebstrap's own list),
    and write apt's auto-installed marks in a fixed order."""
    for rel in UNREPRODUCIBLE_FILES:
        path = rootfs / rel
        if os.path.lexists(path) and not path.is_dir():
            path.unlink()
    for rel in UNREPRODUCIBLE_DIRS:
        path = rootfs / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    sort_extended_states(rootfs / EXTENDED_STATES)


def sort_extended_states(path: Path) -> None:
    """apt writes its marks in the order it met the packages; sort the paragraphs
    (what ``perl -00 -e 'print sort <>'`` does for the base)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    paragraphs = [p.strip("\n") + "\n" for p in text.split("\n\n") if p.strip()]
    ordered = "".join(paragraph + "\n" for paragraph in sorted(paragraphs))
    if ordered != text:
        path.write_text(ordered)
