"""The Swarm edge image, baked by Kiln itself from the recipe shipped beside this file.

The recipe (``kiln.toml`` here) is staged under ``KILN_HOME/edge-image/`` next to a
copy of the running kiln package's source, then baked like any project: cached per
layer, its Debian packages pinned in that directory's ``kiln.lock``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from kiln.errors import KilnError

__all__ = ["EDGE_IMAGE", "RECIPE", "bake_edge_image", "stage_edge_project"]

RECIPE = Path(__file__).with_name("kiln.toml")
EDGE_IMAGE = "edge"
STAGE_DIR = "edge-image"


def stage_edge_project(home: Path) -> Path:
    """``home/edge-image/`` holding the recipe and ``kiln/`` (this package's source
    without bytecode): a fixed place, so ``kiln.lock`` and the file cache persist."""
    import kiln

    source = Path(kiln.__file__).resolve().parent
    root = Path(home).absolute() / STAGE_DIR
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = root / "kiln"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(RECIPE, root / "kiln.toml")
    return root


def bake_edge_image(home: Path) -> str:
    """Bake the edge image into ``home``'s store; its manifest digest."""
    from kiln.image.bake import bake
    from kiln.paths import kiln_home
    from kiln.spec import load_spec

    if Path(home).absolute() != kiln_home():
        raise KilnError(f"the edge image bakes into KILN_HOME ({kiln_home()}), not {home}")
    root = Path(home).absolute() / STAGE_DIR
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two bakes of it at once would stage over each other
        spec = load_spec(stage_edge_project(home) / "kiln.toml")
        return bake(spec, [EDGE_IMAGE])[EDGE_IMAGE].digest
    finally:
        os.close(fd)
