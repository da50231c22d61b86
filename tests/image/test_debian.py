"""Debian bases: the commands as data, kiln.lock, and real bakes from the mirror.

The real bakes share one cold bake per session (``debian_first_bake``, which
builds the minimal base into an empty shared cache); the others start from
fresh homes and must give its digest whether the shared base is warm, absent
(switched off) or failed its checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from conftest_bake import DEB_CACHE, DebianBake, RecordingProgress, default_store, load

from kiln.errors import KilnError
from kiln.image import overlay
from kiln.image.bake import bake
from kiln.image.basecache import BaseCache
from kiln.image.command import PID_NAMESPACE
from kiln.image.debian import (
    DebianBase,
    LockEntry,
    install_argv,
    mmdebstrap_argv,
    parse_apt_simulation,
    parse_debian_base,
    parse_dpkg_status,
    parse_dpkg_versions,
    read_lock,
    render_lock,
    sort_extended_states,
    verify_installed,
    write_lock,
)
from kiln.image.snapshots import SnapshotStore
from kiln.image.unpack import unpack_image
from kiln.paths import kiln_home

BASE = DebianBase("bookworm", "amd64", ("python3-minimal",))
NAMESPACES = list(PID_NAMESPACE)

_HOOKS = [
    '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
    "--setup-hook=sync-in /cache/debs /var/cache/apt/archives",
    "--customize-hook=sync-out /var/cache/apt/archives /cache/.debs-landing-1",
    "--customize-hook=chroot \"$1\" sh -c 'dpkg-query -W -f='\"'\"'${Package}\\n'\"'\"' "
    "| xargs apt-mark auto >/dev/null'",
    '--customize-hook=if [ -f "$1"/var/lib/apt/extended_states ]; then '
    "perl -00 -e 'print sort <>' < \"$1\"/var/lib/apt/extended_states > "
    '"$1"/var/lib/apt/extended_states.sorted && mv "$1"/var/lib/apt/extended_states.sorted '
    '"$1"/var/lib/apt/extended_states; fi',
    '--customize-hook=rm -f "$1"/etc/resolv.conf "$1"/etc/hostname',
]

F = TypeVar("F", bound=Callable[..., None])


def real_bake(test: F) -> F:
    """A test that bakes from the mirror (the session's cold bake at least)."""
    for mark in (
        pytest.mark.e2e,
        pytest.mark.timeout(900),
        pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap --mode=root needs root"),
        pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed"),
    ):
        test = mark(test)
    return test


def test_mmdebstrap_builds_the_minimal_base_in_namespaces_that_die_with_it() -> None:
    argv = mmdebstrap_argv(
        "bookworm",
        "amd64",
        output=Path("/s/rootfs"),
        deb_cache=Path("/cache/debs"),
        landing=Path("/cache/.debs-landing-1"),
    )
    assert argv == [
        *NAMESPACES,
        "--",
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        "--architectures=amd64",
        "--skip=essential/unlink,output/dev",
        "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr",
        *_HOOKS,
        "bookworm",
        "/s/rootfs",
        "http://deb.debian.org/debian",
    ]


def test_mmdebstrap_from_the_lock_pins_every_base_package() -> None:
    argv = mmdebstrap_argv(
        "bookworm",
        "amd64",
        output=Path("/s/rootfs"),
        deb_cache=Path("/cache/debs"),
        landing=Path("/cache/.debs-landing-1"),
        pins={"base-files": "12.4+deb12u5", "apt": "2.6.1"},
    )
    tail = argv[len(NAMESPACES) + 7 :]
    assert tail[:2] == [
        "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr",
        "--include=apt=2.6.1,base-files=12.4+deb12u5",
    ]


def test_mmdebstrap_from_a_usrmerge_lock_builds_as_it_was_resolved() -> None:
    """Locks written before the merged-/usr hook pin usrmerge; they build without it."""
    argv = mmdebstrap_argv(
        "bookworm",
        "amd64",
        output=Path("/s/rootfs"),
        deb_cache=Path("/cache/debs"),
        landing=Path("/cache/.debs-landing-1"),
        pins={"perl": "5.36.0-7+deb12u3", "usrmerge": "35"},
        merged_usr_hook=False,
    )
    assert not any(arg.startswith("--hook-dir") for arg in argv)
    assert "--include=perl=5.36.0-7+deb12u3,usrmerge=35" in argv


def test_the_packages_install_has_no_network_and_marks_only_the_request_manual() -> None:
    argv = install_argv(
        Path("/s/rootfs"),
        [
            Path("/cache/debs/libssl3_3.0_amd64.deb"),
            Path("/cache/debs/python3-minimal_3.11_amd64.deb"),
        ],
        Path("/cache/debs"),
        ("python3-minimal",),
    )
    assert argv[: len(NAMESPACES) + 2] == [*NAMESPACES, "--net", "--"]
    script = argv[-1]
    assert 'mount --bind -o ro /cache/debs "$r/tmp/debs"' in script
    assert (
        "install /tmp/debs/libssl3_3.0_amd64.deb /tmp/debs/python3-minimal_3.11_amd64.deb" in script
    )
    assert "apt-mark auto" in script and "apt-mark manual python3-minimal" in script


def test_parse_debian_base_sorts_packages_and_rejects_bad_names() -> None:
    base = parse_debian_base("debian:bookworm", ["zlib1g", "curl", "curl"], "images.web", "arm64")
    assert base == DebianBase("bookworm", "arm64", ("curl", "zlib1g"))
    assert base.lock_key == "debian:bookworm/arm64+curl,zlib1g"
    with pytest.raises(KilnError, match=r"images.web.packages\[0\]: 'Bad Name'"):
        parse_debian_base("debian:bookworm", ["Bad Name"], "images.web")
    with pytest.raises(KilnError, match=r"images.web.from: 'debian:' is not debian:SUITE"):
        parse_debian_base("debian:", [], "images.web")


def test_lock_keeps_the_base_apart_and_round_trips(tmp_path: Path) -> None:
    entries = {
        "debian:trixie/amd64": LockEntry(
            "trixie", "amd64", (), {"b": "2", "a": "1:1.0+x"}, {"b": "2", "a": "1:1.0+x"}
        ),
        BASE.lock_key: LockEntry(
            "bookworm",
            "amd64",
            ("python3-minimal",),
            {"python3-minimal": "3", "libc6": "2.36-9+u1", "apt": "2.6.1"},
            {"libc6": "2.36-9", "apt": "2.6.1"},
        ),
    }
    text = render_lock(entries)
    data = tomllib.loads(text)
    assert list(data) == [BASE.lock_key, "debian:trixie/amd64"]
    assert data[BASE.lock_key]["base"] == {"apt": "2.6.1", "libc6": "2.36-9"}
    assert "base" not in data["debian:trixie/amd64"]  # no packages: the base is the whole set
    assert list(data["debian:trixie/amd64"]["packages"]) == ["a", "b"]
    write_lock(tmp_path / "kiln.lock", entries)
    assert read_lock(tmp_path / "kiln.lock") == entries
    assert read_lock(tmp_path / "absent.lock") == {}
    # What the packages layer installs: new packages and newer versions of base ones.
    assert entries[BASE.lock_key].layer_packages() == {"python3-minimal": "3", "libc6": "2.36-9+u1"}


def test_a_lock_from_before_bases_were_kept_apart_has_no_base(tmp_path: Path) -> None:
    (tmp_path / "kiln.lock").write_text(
        '["debian:bookworm/amd64+curl"]\nsuite = "bookworm"\narchitecture = "amd64"\n'
        'requested = ["curl"]\n\n["debian:bookworm/amd64+curl".packages]\n"curl" = "7"\n'
    )
    entry = read_lock(tmp_path / "kiln.lock")["debian:bookworm/amd64+curl"]
    assert entry.base is None and entry.packages == {"curl": "7"}


def test_parse_dpkg_versions_and_status() -> None:
    assert parse_dpkg_versions("apt\t2.6.1\nbase-files\t12.4+deb12u5\n\n") == {
        "apt": "2.6.1",
        "base-files": "12.4+deb12u5",
    }
    status = (
        "Package: apt\nStatus: install ok installed\nVersion: 2.6.1\nDescription: x\n y\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        "Package: libc6\nArchitecture: amd64\nStatus: install ok installed\nVersion: 2.36-9\n"
    )
    assert parse_dpkg_status(status) == {"apt": "2.6.1", "libc6": "2.36-9"}


def test_parse_apt_simulation() -> None:
    text = "\n".join(
        [
            "NOTE: This is only a simulation!",
            "Remv usrmerge [35]",
            "Inst libssl3 (3.0.20-1~deb12u2 Debian:12.15/oldstable [amd64])",
            "Inst libc6 [2.36-9] (2.36-9+deb12u4 Debian:12.15/oldstable, Debian:x [amd64])",
            "Inst python3-minimal (3.11.2-1+b1 Debian:12.15/oldstable [amd64])",
            "Conf libssl3 (3.0.20-1~deb12u2 Debian:12.15/oldstable [amd64])",
        ]
    )
    plan = parse_apt_simulation(text)
    assert plan.install == {
        "libssl3": "3.0.20-1~deb12u2",
        "libc6": "2.36-9+deb12u4",
        "python3-minimal": "3.11.2-1+b1",
    }
    assert plan.remove == ("usrmerge",)


def test_apt_marks_are_sorted_as_mmdebstrap_sorts_the_base(tmp_path: Path) -> None:
    states = tmp_path / "extended_states"
    states.write_text("Package: zz\nAuto-Installed: 1\n\nPackage: aa\nAuto-Installed: 1\n\n")
    sort_extended_states(states)
    assert (
        states.read_text() == "Package: aa\nAuto-Installed: 1\n\nPackage: zz\nAuto-Installed: 1\n\n"
    )


@pytest.mark.parametrize(
    ("installed", "message"),
    [
        ({"apt": "2.6.2"}, "apt is 2.6.2, kiln.lock says 2.6.1"),
        ({"apt": "2.6.1", "curl": "8"}, "curl 8 was installed but is not in kiln.lock"),
        ({}, "apt 2.6.1 is in kiln.lock but was not installed"),
    ],
)
def test_verify_installed_names_the_package_and_the_fix(
    installed: dict[str, str], message: str
) -> None:
    with pytest.raises(KilnError) as err:
        verify_installed(installed, {"apt": "2.6.1"}, "images.web.from")
    assert message in str(err.value)
    assert "kiln bake --update-lock" in str(err.value)
    verify_installed({"apt": "2.6.1"}, {"apt": "2.6.1"}, "images.web.from")


# -- real bakes ----------------------------------------------------------------------


def _fresh(tmp_path: Path, first: DebianBake, name: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the session's project (with its kiln.lock) and a fresh KILN_HOME."""
    project = tmp_path / name
    shutil.copytree(first.project, project)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / f"{name}-home"))
    return project


def _image_has_the_answer(digest: str, dest: Path) -> None:
    unpack_image(default_store(), f"py@{digest}", dest)
    assert (dest / "answer").read_text() == "42\n"
    assert not (dest / "etc" / "resolv.conf").exists()
    assert not (dest / "dev").exists()
    assert (dest / "bin").readlink() == Path("usr/bin")
    assert "/usr/bin/python3.11 f 755 0 0 0" in (dest / "tree").read_text()


@real_bake
def test_first_bake_keeps_the_minimal_base_shared_and_locks_base_and_packages(
    debian_first_bake: DebianBake, tmp_path: Path
) -> None:
    first = debian_first_bake
    print(f"cold first bake (mmdebstrap into an empty shared cache): {first.seconds:.1f}s")
    lock = tomllib.loads((first.project / "kiln.lock").read_text())
    entry = lock["debian:bookworm/amd64+python3-minimal"]
    assert entry["suite"] == "bookworm" and entry["requested"] == ["python3-minimal"]
    packages, base = entry["packages"], entry["base"]
    assert "python3-minimal" in packages and "python3-minimal" not in base
    assert "base-files" in base and base["base-files"] == packages["base-files"]
    assert "usr-is-merged" in base and "usrmerge" not in packages and "perl" not in packages
    assert list(packages) == sorted(packages)

    # The minimal base and the packages layer are kept once, whole, in the shared cache,
    # beside the SBOM read of each large layer (supply/sbom/<layer digest>-v1.json).
    entries = sorted(
        p.name.split("-")[0] for p in first.bases.iterdir() if not p.name.startswith(".")
    )
    assert entries == ["base", "current", "layer", "supply"]
    cache = BaseCache(first.bases)
    (key,) = cache.bases()
    shared = cache.base(key)
    assert shared is not None and shared.packages == base
    store_path = first.home / "images"
    manifest = json.loads((store_path / "blobs" / "sha256" / first.result.digest[7:]).read_text())
    sbom_reads = {p.name.split("-")[0] for p in (first.bases / "supply" / "sbom").iterdir()}
    assert sbom_reads and sbom_reads <= {d["digest"][7:] for d in manifest["layers"]}
    layers = [layer["digest"] for layer in manifest["layers"]]
    assert layers[0] == shared.layer.digest and len(layers) == 4  # base, packages, 2 steps
    config = json.loads(
        (store_path / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text()
    )
    assert [h["created_by"] for h in config["history"]][:2] == [
        "kiln: mmdebstrap --variant=minbase bookworm",
        "kiln: apt-get install python3-minimal",
    ]

    # mmdebstrap's and apt's own lines went to the log; the display got one line per phase.
    log = (first.home / "cache" / "bake-logs" / "py.log").read_text()
    assert "I: installing essential packages..." in log and "Setting up python3-minimal" in log
    shown = first.progress.output("py")
    assert not any(line.startswith(("I: ", "Setting up")) for line in shown)
    assert any(
        "building the minimal base debian:bookworm/amd64 with mmdebstrap" in line for line in shown
    )
    assert any(s.startswith("I: ") for s in first.progress.statuses("py"))


@real_bake
def test_fresh_homes_with_the_warm_shared_base_bake_the_same_digest_in_seconds(
    debian_first_bake: DebianBake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two new homes (two id ranges): no mmdebstrap, no apt, the same digest; the base
    snapshot each gets is a copy of the shared tree with its own owners."""
    first = debian_first_bake
    first.warm(monkeypatch)
    seconds: list[float] = []
    ranges: list[int] = []
    for name in ("one", "two"):
        project = _fresh(tmp_path, first, name, monkeypatch)
        progress = RecordingProgress()
        started = time.monotonic()
        again = bake(load(project), progress=progress)["py"]
        seconds.append(time.monotonic() - started)
        assert again.digest == first.result.digest
        assert (project / "kiln.lock").read_text() == (first.project / "kiln.lock").read_text()
        assert not any(
            "mmdebstrap" in line or "resolving" in line for line in progress.output("py")
        )
        base_snapshot = SnapshotStore(kiln_home()).find(
            default_store().config(f"py@{again.digest}")["rootfs"]["diff_ids"][0]
        )
        assert base_snapshot is not None
        owner = (base_snapshot / "fs" / "usr" / "bin" / "dpkg").lstat().st_uid
        ids = SnapshotStore(kiln_home()).ids
        assert owner == ids.to_host(0) != 0
        ranges.append(ids.base)
    assert len(set(ranges)) == 2  # two homes, two id ranges, one shared tree
    print(f"first bake in a fresh home over the warm shared base: {seconds}")
    assert max(seconds) < 15, seconds
    _image_has_the_answer(first.result.digest, tmp_path / "rootfs")

    # --no-cache installs the packages again over the shared tree: the same layer.
    again = bake(load(project), no_cache=True)["py"]
    assert again.digest == first.result.digest


@real_bake
def test_without_the_shared_base_or_overlays_the_bake_builds_everything_to_the_same_digest(
    debian_first_bake: DebianBake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No shared cache: mmdebstrap from the lock's base; and no overlayfs: apt installs
    into a plain copy of that tree, the steps run over the layers unpacked."""
    first = debian_first_bake
    monkeypatch.setenv("KILN_BASE_CACHE", "off")
    monkeypatch.setenv("KILN_CACHE", os.environ.get("KILN_CACHE", str(DEB_CACHE)))
    monkeypatch.setattr(overlay, "overlay_usable", lambda scratch: False)
    project = _fresh(tmp_path, first, "alone", monkeypatch)
    progress = RecordingProgress()
    alone = bake(load(project), progress=progress)["py"]
    assert alone.digest == first.result.digest
    assert any("the shared cache is off" in line for line in progress.output("py"))
    assert not list(Path(tempfile.gettempdir()).glob(f"kiln-debian-{os.getpid()}-*"))
    assert not (kiln_home() / "snapshots").exists()

    # The re-bake takes both layers from the home's layer cache.
    cached = bake(load(project))["py"]
    assert (cached.digest, cached.layers_built) == (first.result.digest, 0)


@real_bake
def test_a_lock_from_before_bases_were_kept_apart_finds_the_base_and_gains_its_table(
    debian_first_bake: DebianBake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = debian_first_bake
    first.warm(monkeypatch)
    project = _fresh(tmp_path, first, "legacy", monkeypatch)
    entries = read_lock(project / "kiln.lock")
    key = "debian:bookworm/amd64+python3-minimal"
    entry = entries[key]
    entries[key] = LockEntry(entry.suite, entry.architecture, entry.requested, entry.packages, None)
    write_lock(project / "kiln.lock", entries)
    assert "base" not in tomllib.loads((project / "kiln.lock").read_text())[key]
    legacy = bake(load(project))["py"]
    assert legacy.digest == first.result.digest
    assert (project / "kiln.lock").read_text() == (first.project / "kiln.lock").read_text()


@real_bake
def test_a_shared_layer_that_fails_its_hash_is_made_again(
    debian_first_bake: DebianBake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = debian_first_bake
    bases = tmp_path / "bases"
    subprocess.run(["cp", "-a", str(first.bases), str(bases)], check=True)
    (layer_dir,) = bases.glob("layer-*")
    blob = layer_dir / "layer.tar.gz"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    blob.write_bytes(bytes(data))
    monkeypatch.setenv("KILN_BASE_CACHE", str(bases))
    monkeypatch.setenv("KILN_CACHE", os.environ.get("KILN_CACHE", str(DEB_CACHE)))
    project = _fresh(tmp_path, first, "corrupt", monkeypatch)
    progress = RecordingProgress()
    again = bake(load(project), progress=progress)["py"]
    assert again.digest == first.result.digest
    assert any("installing python3-minimal" in line for line in progress.output("py"))
    (layer_dir,) = bases.glob("layer-*")
    record = json.loads((layer_dir / "record.json").read_text())
    assert "sha256:" + _sha256(layer_dir / "layer.tar.gz") == record["layer"]["digest"]


@real_bake
def test_a_package_apt_cannot_find_fails_with_apts_own_words(
    debian_first_bake: DebianBake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = debian_first_bake
    first.warm(monkeypatch)
    project = tmp_path / "missing"
    project.mkdir()
    (project / "kiln.toml").write_text(
        '[project]\nname = "m"\n\n[images.m]\nfrom = "debian:bookworm"\n'
        'packages = ["kiln-no-such-package"]\n'
    )
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    with pytest.raises(KilnError) as err:
        bake(load(project))
    text = str(err.value)
    assert text.startswith("kiln.toml: images.m.packages: apt cannot install kiln-no-such-package")
    assert "Unable to locate package kiln-no-such-package" in text
    assert not (project / "kiln.lock").exists()


@real_bake
def test_a_failing_mmdebstrap_shows_its_last_lines_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suite the mirror does not have: mmdebstrap fails; the error ends with its last
    lines (apt's own words among them), the whole output is in the log, nothing is kept."""
    bases = tmp_path / "bases"
    monkeypatch.setenv("KILN_BASE_CACHE", str(bases))
    monkeypatch.setenv("KILN_CACHE", os.environ.get("KILN_CACHE", str(DEB_CACHE)))
    project = tmp_path / "bad"
    project.mkdir()
    (project / "kiln.toml").write_text(
        '[project]\nname = "bad"\n\n[images.web]\nfrom = "debian:kiln-never"\n'
    )
    with pytest.raises(KilnError) as err:
        bake(load(project))
    text = str(err.value)
    log = kiln_home() / "cache" / "bake-logs" / "web.log"
    first, *tail = text.splitlines()
    assert first == (
        "kiln.toml: images.web.from: mmdebstrap failed with exit 25; its last lines "
        f"(the whole output is in {log}):"
    )
    assert 0 < len(tail) <= 20
    assert "E: The repository 'http://deb.debian.org/debian kiln-never Release' does not " in text
    assert "does not have a Release file" in log.read_text()
    assert [p.name for p in bases.iterdir() if p.name != ".locks"] == []
    assert not list(Path(tempfile.gettempdir()).glob(f"kiln-debian-{os.getpid()}-*"))
    assert not (project / "kiln.lock").exists()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
