"""Debian bases: the mmdebstrap command as data, kiln.lock, and one real bake from the mirror."""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest_bake import DEB_CACHE, RecordingProgress, default_store, load

from kiln.errors import KilnError
from kiln.image.bake import BakeResult, bake
from kiln.image.debian import (
    DebianBase,
    LockEntry,
    mmdebstrap_argv,
    parse_debian_base,
    parse_dpkg_versions,
    read_lock,
    render_lock,
    verify_installed,
    write_lock,
)
from kiln.image.unpack import unpack_image

BASE = DebianBase("bookworm", "amd64", ("python3-minimal",))

_HOOKS = [
    '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
    "--setup-hook=sync-in /cache/debs /var/cache/apt/archives",
    "--customize-hook=sync-out /var/cache/apt/archives /cache/debs",
    "--customize-hook=chroot \"$1\" sh -c 'dpkg-query -W -f='\"'\"'${Package}\\n'\"'\"' "
    "| xargs apt-mark auto >/dev/null && apt-mark manual python3-minimal >/dev/null'",
    '--customize-hook=if [ -f "$1"/var/lib/apt/extended_states ]; then '
    "perl -00 -e 'print sort <>' < \"$1\"/var/lib/apt/extended_states > "
    '"$1"/var/lib/apt/extended_states.sorted && mv "$1"/var/lib/apt/extended_states.sorted '
    '"$1"/var/lib/apt/extended_states; fi',
    "--customize-hook=chroot \"$1\" dpkg-query -W -f='${Package}\\t${Version}\\n' > /s/versions",
    '--customize-hook=rm -f "$1"/etc/resolv.conf "$1"/etc/hostname',
]


def test_mmdebstrap_argv_first_bake_asks_for_the_requested_packages() -> None:
    argv = mmdebstrap_argv(
        BASE,
        output=Path("/s/rootfs"),
        versions_out=Path("/s/versions"),
        deb_cache=Path("/cache/debs"),
    )
    assert argv == [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        "--architectures=amd64",
        "--skip=essential/unlink,output/dev",
        "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr",
        "--include=python3-minimal",
        *_HOOKS,
        "bookworm",
        "/s/rootfs",
        "http://deb.debian.org/debian",
    ]


def test_mmdebstrap_argv_from_the_lock_pins_every_package() -> None:
    argv = mmdebstrap_argv(
        BASE,
        output=Path("/s/rootfs"),
        versions_out=Path("/s/versions"),
        deb_cache=Path("/cache/debs"),
        locked={"python3-minimal": "3.11.2-1+b1", "base-files": "12.4+deb12u5"},
    )
    assert argv[11:13] == [
        "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr",
        "--include=base-files=12.4+deb12u5,python3-minimal=3.11.2-1+b1",
    ]


def test_mmdebstrap_argv_from_a_usrmerge_lock_builds_as_it_was_resolved() -> None:
    """Locks written before the merged-/usr hook pin usrmerge; they must keep their digest."""
    argv = mmdebstrap_argv(
        BASE,
        output=Path("/s/rootfs"),
        versions_out=Path("/s/versions"),
        deb_cache=Path("/cache/debs"),
        locked={"perl": "5.36.0-7+deb12u3", "usrmerge": "35", "python3-minimal": "3.11.2-1+b1"},
    )
    assert not any(arg.startswith("--hook-dir") for arg in argv)
    assert argv[11] == "--include=perl=5.36.0-7+deb12u3,python3-minimal=3.11.2-1+b1,usrmerge=35"


def test_parse_debian_base_sorts_packages_and_rejects_bad_names() -> None:
    base = parse_debian_base("debian:bookworm", ["zlib1g", "curl", "curl"], "images.web", "arm64")
    assert base == DebianBase("bookworm", "arm64", ("curl", "zlib1g"))
    assert base.lock_key == "debian:bookworm/arm64+curl,zlib1g"
    with pytest.raises(KilnError, match=r"images.web.packages\[0\]: 'Bad Name'"):
        parse_debian_base("debian:bookworm", ["Bad Name"], "images.web")
    with pytest.raises(KilnError, match=r"images.web.from: 'debian:' is not debian:SUITE"):
        parse_debian_base("debian:", [], "images.web")


def test_lock_is_sorted_toml_and_round_trips(tmp_path: Path) -> None:
    entries = {
        "debian:trixie/amd64": LockEntry("trixie", "amd64", (), {"b": "2", "a": "1:1.0+x"}),
        BASE.lock_key: LockEntry(
            "bookworm", "amd64", ("python3-minimal",), {"python3-minimal": "3"}
        ),
    }
    text = render_lock(entries)
    data = tomllib.loads(text)
    assert list(data) == [BASE.lock_key, "debian:trixie/amd64"]
    assert list(data["debian:trixie/amd64"]["packages"]) == ["a", "b"]
    write_lock(tmp_path / "kiln.lock", entries)
    assert read_lock(tmp_path / "kiln.lock") == {
        key: LockEntry(e.suite, e.architecture, e.requested, dict(e.packages))
        for key, e in entries.items()
    }
    assert read_lock(tmp_path / "absent.lock") == {}


def test_parse_dpkg_versions() -> None:
    assert parse_dpkg_versions("apt\t2.6.1\nbase-files\t12.4+deb12u5\n\n") == {
        "apt": "2.6.1",
        "base-files": "12.4+deb12u5",
    }


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


# -- the one real Debian bake -------------------------------------------------

# Everything of the base a run step could record, except a directory's st_size (how
# many entries the filesystem's directory blocks once held, which no layer carries).
TREE_LISTING = (
    "find /etc /usr /var -xdev \\\\( -type d -printf '%p d %m %U %G %T@\\\\n' \\\\) "
    "-o -printf '%p %y %m %U %G %T@ %s %l\\\\n' | sort"
)

DEBIAN_RECIPE = """[project]
name = "deb"

[images.py]
from = "debian:bookworm"
packages = ["python3-minimal"]
steps = [
  { run = "python3 -c 'print(6 * 7)' > /answer" },
  { run = "TREE_LISTING > /tree" },
]
cmd = ["python3"]
""".replace("TREE_LISTING", TREE_LISTING)


@pytest.fixture(scope="session")
def debian_first_bake(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, BakeResult]]:
    """One cold bake per test session; .debs land in a fixed cache so the next session is fast."""
    root = tmp_path_factory.mktemp("debian")
    project = root / "project"
    project.mkdir()
    (project / "kiln.toml").write_text(DEBIAN_RECIPE)
    saved = {k: os.environ.get(k) for k in ("KILN_HOME", "KILN_CACHE")}
    os.environ["KILN_HOME"] = str(root / "home")
    os.environ.setdefault("KILN_CACHE", str(DEB_CACHE))
    try:
        result = bake(load(project))["py"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield project, result


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap --mode=root needs root")
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap not installed")
def test_debian_bake_writes_the_lock_and_rebakes_from_it_to_the_same_digest(
    debian_first_bake: tuple[Path, BakeResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, first = debian_first_bake
    lock = tomllib.loads((project / "kiln.lock").read_text())
    entry = lock["debian:bookworm/amd64+python3-minimal"]
    assert entry["suite"] == "bookworm" and entry["requested"] == ["python3-minimal"]
    assert "python3-minimal" in entry["packages"] and "base-files" in entry["packages"]
    assert "usr-is-merged" in entry["packages"]
    assert "usrmerge" not in entry["packages"] and "perl" not in entry["packages"]
    assert list(entry["packages"]) == sorted(entry["packages"])

    fresh = tmp_path / "elsewhere"
    shutil.copytree(project, fresh)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "fresh-home"))
    monkeypatch.setenv("KILN_CACHE", os.environ.get("KILN_CACHE", str(DEB_CACHE)))
    progress = RecordingProgress()
    again = bake(load(fresh), progress=progress)["py"]
    assert again.digest == first.digest
    assert (fresh / "kiln.lock").read_text() == (project / "kiln.lock").read_text()
    dest = tmp_path / "rootfs"
    unpack_image(default_store(), f"py@{again.digest}", dest)
    assert (dest / "answer").read_text() == "42\n"
    assert not (dest / "etc" / "resolv.conf").exists()
    assert not (dest / "dev").exists()
    assert (dest / "bin").readlink() == Path("usr/bin")
    assert "/usr/bin/python3.11 f 755 0 0 0" in (dest / "tree").read_text()

    cached = bake(load(fresh))["py"]
    assert (cached.digest, cached.layers_built) == (first.digest, 0)

    # The cold bakes ran their steps over mmdebstrap's own tree. With only the base
    # layer left in the cache, the steps run over the layer unpacked instead: every
    # metadata-sensitive byte they write (/tree) must come out the same.
    cache = Path(os.environ["KILN_HOME"]) / "cache" / "layers"
    base_layer = default_store().manifest(f"py@{first.digest}")["layers"][0]["digest"]
    for path in cache.glob("*/*.json"):
        if (json.loads(path.read_text()).get("layer") or {}).get("digest") != base_layer:
            path.unlink()
    progress = RecordingProgress()
    unpacked = bake(load(fresh), progress=progress)["py"]
    assert [e[4] for e in progress.finished("py")] == [True, False, False]
    assert unpacked.digest == first.digest
