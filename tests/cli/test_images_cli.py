"""``kiln images`` says when an image was baked, while the image itself keeps its
reproducible timestamp (and so its digest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

KILN = str(Path(sys.executable).parent / "kiln")
EPOCH = 1_700_000_000
RECIPE = """\
[project]
name = "when"

[images.site]
from = "scratch"
steps = [{ copy = "files/", to = "/srv" }]
"""


def kiln(*args: str, home: Path, cwd: Path) -> str:
    env = dict(os.environ, KILN_HOME=str(home), SOURCE_DATE_EPOCH=str(EPOCH))
    out = subprocess.run([KILN, *args], env=env, cwd=cwd, text=True, capture_output=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_images_show_the_bake_time_and_the_image_keeps_its_reproducible_one(
    tmp_path: Path,
) -> None:
    project, home = tmp_path / "p", tmp_path / "home"
    (project / "files").mkdir(parents=True)
    (project / "files" / "index.html").write_text("hello\n")
    (project / "kiln.toml").write_text(RECIPE)
    before = time.time()
    first = kiln("bake", home=home, cwd=project).strip()
    again = kiln("bake", "--no-cache", home=home, cwd=project).strip()
    after = time.time()
    assert first == again and first.startswith("site@sha256:"), "same recipe, same digest"

    [listed] = json.loads(kiln("images", "--json", home=home, cwd=project))
    assert listed["digest"] == first.removeprefix("site@")
    baked = datetime.fromisoformat(listed["created"]).timestamp()
    assert int(before) - 1 <= baked <= after + 1, listed["created"]

    table = kiln("images", home=home, cwd=project).splitlines()
    assert table[0].split() == ["NAME", "TAG", "DIGEST", "CREATED", "SIZE"]
    shown = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(baked))
    assert shown in table[1], table

    inspected = json.loads(kiln("image", "inspect", "site", home=home, cwd=project))
    assert inspected["config"]["created"] == "2023-11-14T22:13:20Z"  # SOURCE_DATE_EPOCH
    assert inspected["created"] == listed["created"]
