"""The machine-wide SBOM cache written as an attacker would arrange it: a directory of
its chain planted beforehand (a symlink to elsewhere, one owned by another user, one
anyone may write) must not be written through, as it is not read through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_sbom_shared import _image, _packages

from kiln.image.store import ImageStore


@pytest.mark.parametrize("plant", ["supply symlink", "sbom symlink", "open sbom", "other owner"])
def test_a_planted_directory_of_the_shared_cache_is_never_written_through(
    tmp_path: Path, plant: str
) -> None:
    bases = tmp_path / "bases"
    bases.mkdir(mode=0o700)
    shared = bases / "supply" / "sbom"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if plant == "supply symlink":
        (bases / "supply").symlink_to(elsewhere)
        written = elsewhere
    elif plant == "sbom symlink":
        (bases / "supply").mkdir(mode=0o700)
        shared.symlink_to(elsewhere)
        written = elsewhere
    elif plant == "open sbom":
        shared.mkdir(parents=True)
        os.chmod(shared, 0o777)
        written = shared
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        shared.mkdir(parents=True)
        os.chown(shared, 65534, 65534)
        written = shared
    store = ImageStore(tmp_path / "home" / "images")
    ref, _ = _image(store, "img:1")
    assert _packages(store, ref, tmp_path / "home", shared) == ["good"]
    assert [p.name for p in written.rglob("*")] == []
