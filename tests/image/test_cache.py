"""The layer cache and the file-hash cache behind copy steps."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.image.bake import copy_inputs
from kiln.image.cache import CachedLayer, FileHashCache, LayerCache, step_key
from kiln.image.digest import MEDIA_TYPE_LAYER_GZIP
from kiln.image.store import ImageStore


def test_entry_round_trips_and_a_gcd_blob_is_a_miss(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    cache = LayerCache(tmp_path / "cache" / "layers")
    desc = store.put_bytes(b"layer bytes", MEDIA_TYPE_LAYER_GZIP)
    entry = CachedLayer(desc, "sha256:" + "a" * 64, 11)
    cache.put("k1", entry)
    cache.put("k2", CachedLayer(None, None))
    assert cache.get("k1", store) == entry
    assert cache.get("k2", store) == CachedLayer(None, None, 0)
    assert cache.get("absent", store) is None
    assert cache.digests() == {desc.digest}
    store.gc()
    assert not store.has(desc.digest)
    assert cache.get("k1", store) is None


def test_corrupt_entry_is_a_miss(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    cache = LayerCache(tmp_path / "layers")
    cache.put("kk", CachedLayer(None, None))
    (tmp_path / "layers" / "kk" / "kk.json").write_text("{not json")
    assert cache.get("kk", store) is None


def test_step_key_depends_on_parents_and_step_only() -> None:
    a = step_key(["sha256:1"], {"run": "x", "env": {"A": "1", "B": "2"}})
    assert a == step_key(["sha256:1"], {"env": {"B": "2", "A": "1"}, "run": "x"})
    assert a != step_key(["sha256:2"], {"run": "x", "env": {"A": "1", "B": "2"}})
    assert a != step_key(["sha256:1"], {"run": "y", "env": {"A": "1", "B": "2"}})


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "sub" / "run.sh", 0o700)
    (root / "link").symlink_to("a.txt")
    return root


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    first = FileHashCache(tmp_path / "files", tree)
    inputs = copy_inputs(tree, first, "where")
    assert first.hashed == 2
    first.save()
    again = FileHashCache(tmp_path / "files", tree)
    assert copy_inputs(tree, again, "where") == inputs
    assert again.hashed == 0
    (tree / "a.txt").write_text("b")
    changed = copy_inputs(tree, again, "where")
    assert again.hashed == 1
    assert changed != inputs


def test_copy_inputs_ignore_umask_and_mtime_but_see_exec_bits(tmp_path: Path) -> None:
    one = _tree(tmp_path / "one")
    old = os.umask(0o077)
    try:
        two = _tree(tmp_path / "two")
    finally:
        os.umask(old)
    os.utime(two / "a.txt", (1, 1))
    files = FileHashCache(tmp_path / "files", tmp_path)
    inputs = copy_inputs(one, files, "w")
    assert inputs == copy_inputs(two, files, "w")
    assert inputs == [
        [
            "a.txt",
            "file",
            0o644,
            "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb",
        ],
        ["link", "link", 0o777, "a.txt"],
        ["sub", "dir", 0o755, None],
        ["sub/run.sh", "file", 0o755, inputs[3][3]],
    ]
