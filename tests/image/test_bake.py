"""The bake executor end to end on busybox recipes: real runc steps, real store, real cache."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest_bake import (
    APP_FILES,
    BUSYBOX_RECIPE,
    RecordingProgress,
    default_store,
    index_refs,
    load,
    make_project,
    needs_busybox,
    staging_dirs,
)

from kiln.errors import KilnError
from kiln.image import sandbox
from kiln.image.bake import bake, bake_order, git_facts, source_date_epoch
from kiln.image.base import oci_architecture
from kiln.image.unpack import unpack_image

pytestmark = [
    needs_busybox,
    pytest.mark.skipif(sandbox.step_blocker() is not None, reason=str(sandbox.step_blocker())),
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", BUSYBOX_RECIPE, files=APP_FILES)


def test_bake_runs_steps_and_the_image_holds_their_results(project: Path, tmp_path: Path) -> None:
    progress = RecordingProgress()
    results = bake(load(project), progress=progress)
    result = results["bb"]
    assert result.digest.startswith("sha256:")
    assert result.ref_names == (f"bb:{result.digest[7:19]}",)
    assert (result.layers_built, result.layers_cached) == (4, 0)
    store = default_store()
    dest = tmp_path / "unpacked"
    unpack_image(store, f"bb@{result.digest}", dest)
    assert (dest / "etc" / "marker").read_text() == "baked\n"
    assert (dest / "srv" / "listing").read_text() == "data\nmain.sh\n"
    assert (dest / "srv" / "app" / "greeting.txt").read_text() == "hi\n"
    assert (dest / "bin" / "sh").readlink() == Path("busybox")
    assert not (dest / "proc").exists() and not (dest / "tmp").exists()
    config = store.config(f"bb@{result.digest}")
    assert config["os"] == "linux" and config["created"] == "1970-01-01T00:00:00Z"
    assert config["config"]["Env"] == ["APP=demo", "GREETING=hi"]
    assert config["config"]["WorkingDir"] == "/srv/app"
    assert config["config"]["Cmd"] == ["/bin/sh", "-c", "cat greeting.txt"]
    assert config["config"]["ExposedPorts"] == {"8080/tcp": {}}
    assert config["config"]["Labels"] == {"team": "core"}
    assert len(config["rootfs"]["diff_ids"]) == 4
    assert len([h for h in config["history"] if not h.get("empty_layer")]) == 4
    manifest = store.manifest(f"bb@{result.digest}")
    assert manifest["annotations"]["org.opencontainers.image.title"] == "bb"
    cached_by_step = {e[2]: e[4] for e in progress.finished("bb")}
    assert [cached_by_step[i] for i in (1, 2, 3, 6)] == [False] * 4
    assert progress.output("bb") == ["listed"]
    assert staging_dirs() == []


def test_second_bake_is_all_cache_hits_with_the_same_digest(project: Path) -> None:
    first = bake(load(project))["bb"]
    progress = RecordingProgress()
    started = time.monotonic()
    second = bake(load(project), progress=progress)["bb"]
    elapsed = time.monotonic() - started
    assert second.digest == first.digest
    assert (second.layers_built, second.layers_cached) == (0, 4)
    assert all(e[4] for e in progress.finished("bb"))
    assert elapsed < 1.0


def test_no_cache_rebuilds_every_layer_to_the_same_digest(project: Path) -> None:
    first = bake(load(project))["bb"]
    again = bake(load(project), no_cache=True)["bb"]
    assert again.digest == first.digest
    assert (again.layers_built, again.layers_cached) == (4, 0)


def test_changing_a_copied_file_rebuilds_from_that_step(project: Path) -> None:
    first = bake(load(project))["bb"]
    (project / "app" / "main.sh").write_text("echo changed\n")
    second = bake(load(project))["bb"]
    assert second.digest != first.digest
    assert (second.layers_built, second.layers_cached) == (3, 1)


def test_same_digest_in_another_directory_home_and_umask(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = bake(load(project))["bb"]
    old = os.umask(0o077)
    try:
        other = make_project(tmp_path / "elsewhere" / "copy", BUSYBOX_RECIPE, files=APP_FILES)
        os.utime(other / "app" / "main.sh", (1_000_000_000, 1_000_000_000))
        monkeypatch.setenv("KILN_HOME", str(tmp_path / "other-home"))
        second = bake(load(other))["bb"]
    finally:
        os.umask(old)
    assert second.layers_cached == 0
    assert second.digest == first.digest


def test_source_date_epoch_sets_created(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    result = bake(load(project))["bb"]
    config = default_store().config(f"bb@{result.digest}")
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert (
        default_store().manifest(f"bb@{result.digest}")["annotations"][
            "org.opencontainers.image.created"
        ]
        == "2023-11-14T22:13:20Z"
    )


def test_failing_step_names_the_step_shows_output_and_leaves_the_store_unchanged(
    tmp_path: Path,
) -> None:
    good = make_project(tmp_path / "good", BUSYBOX_RECIPE, files=APP_FILES)
    bake(load(good))
    store = default_store()
    before = index_refs(store)
    bad = make_project(
        tmp_path / "bad",
        """
[images.web]
from = "scratch"
steps = [
  { copy = "rootfs/", to = "/" },
  { env = { X = "1" } },
  { run = "echo preparing; echo oops >&2; exit 2" },
]
""",
    )
    with pytest.raises(KilnError) as err:
        bake(load(bad))
    assert str(err.value) == "images.web step 3 (run): exit 2\npreparing\noops"
    assert index_refs(store) == before
    assert staging_dirs() == []


def test_network_is_off_unless_the_step_asks(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "net",
        """
[images.net]
from = "scratch"
steps = [
  { copy = "rootfs/", to = "/" },
  { run = "busybox ip -o link | busybox cut -d: -f2 | busybox tr -d ' ' > /links" },
]
""",
    )
    result = bake(load(project))["net"]
    dest = tmp_path / "out"
    unpack_image(default_store(), f"net@{result.digest}", dest)
    assert (dest / "links").read_text() == "lo\n"


def test_copy_source_missing_names_file_and_step(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "p",
        """
[images.web]
from = "scratch"
steps = [{ copy = "rootfs/", to = "/" }, { copy = "app/", to = "/srv/app" }]
""",
    )
    with pytest.raises(
        KilnError, match=r"^kiln.toml: images.web.steps\[1\].copy: app/ does not exist$"
    ):
        bake(load(project))


@pytest.mark.parametrize("source", ["../outside", "/etc/hostname", "link-out"])
def test_copy_source_outside_the_project_is_refused(tmp_path: Path, source: str) -> None:
    (tmp_path / "outside").mkdir()
    project = make_project(
        tmp_path / "p",
        f"""
[images.web]
from = "scratch"
steps = [{{ copy = "{source}", to = "/x" }}]
""",
    )
    (project / "link-out").symlink_to(tmp_path / "outside")
    with pytest.raises(KilnError, match=r"images.web.steps\[0\].copy: .* outside the project"):
        bake(load(project))


def test_copy_chmod_and_single_file_into_directory(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "p",
        """
[images.web]
from = "scratch"
steps = [
  { copy = "rootfs/", to = "/" },
  { copy = "tool.sh", to = "/usr/local/bin/", chmod = "0750" },
  { run = "busybox stat -c '%a %n' /usr/local/bin/tool.sh > /mode" },
]
""",
        files={"tool.sh": "#!/bin/sh\n"},
    )
    result = bake(load(project))["web"]
    dest = tmp_path / "out"
    unpack_image(default_store(), f"web@{result.digest}", dest)
    assert (dest / "mode").read_text() == "750 /usr/local/bin/tool.sh\n"


def test_dependency_order_image_base_and_selection(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "p",
        BUSYBOX_RECIPE
        + """
[images.child]
from = "image:bb"
steps = [{ run = "cat /etc/marker > /from-parent" }]
tag = "v1"

[images.solo]
from = "scratch"
steps = [{ copy = "rootfs/", to = "/" }]
""",
        files=APP_FILES,
    )
    spec = load(project)
    assert bake_order(spec, ["child"]) == ["bb", "child"]
    results = bake(spec, ["child"])
    assert list(results) == ["bb", "child"]
    child = results["child"]
    assert child.ref_names[1] == "child:v1"
    store = default_store()
    parent_ids = store.config(f"bb@{results['bb'].digest}")["rootfs"]["diff_ids"]
    child_config = store.config("child:v1")
    assert child_config["rootfs"]["diff_ids"][:4] == parent_ids
    assert child_config["config"]["Env"] == ["APP=demo", "GREETING=hi"]
    everything = bake(spec)
    assert set(everything) == {"bb", "child", "solo"}
    assert everything["child"].digest == child.digest


def test_immutable_tag_refuses_a_different_image(tmp_path: Path) -> None:
    recipe = BUSYBOX_RECIPE + 'tag = "stable"\n'
    project = make_project(tmp_path / "p", recipe, files=APP_FILES)
    bake(load(project))
    (project / "app" / "main.sh").write_text("different\n")
    with pytest.raises(KilnError, match=r"images.bb.tag: tag bb:stable already points at"):
        bake(load(project))


def test_cycle_is_refused_with_its_path(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "p",
        """
[images.a]
from = "image:b"

[images.b]
from = "image:a"
""",
    )
    with pytest.raises(KilnError, match=r"^kiln.toml: images.a.from: cycle a → b → a$"):
        bake(load(project))


def test_missing_base_names_the_recipe_key(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", '[images.web]\nfrom = "oci:./nowhere"\n')
    with pytest.raises(
        KilnError, match=r"^kiln.toml: images.web.from: oci:./nowhere: no OCI layout"
    ):
        bake(load(project))
    with pytest.raises(KilnError, match=r"no recipe images.nope"):
        bake(load(project), ["nope"])


def _write_layout(root: Path, layers: list[bytes]) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    gz = [gzip.compress(layer, mtime=0) for layer in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["FROM_OCI=1"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers],
            },
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": put(g),
                    "size": len(g),
                }
                for g in gz
            ],
        }
    ).encode()
    digest = put(manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": digest,
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": "v1"},
                    }
                ],
            }
        )
    )


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_oci_layout_base_is_imported_and_run_over(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "p",
        """
[images.web]
from = "oci:./layout:v1"
steps = [
  { copy = "rootfs/", to = "/" },
  { run = "cat /hello.txt > /copied; echo $FROM_OCI >> /copied" },
]
""",
    )
    _write_layout(project / "layout", [_tar({"hello.txt": b"from oci\n"})])
    result = bake(load(project))["web"]
    dest = tmp_path / "out"
    unpack_image(default_store(), f"web@{result.digest}", dest)
    assert (dest / "copied").read_text() == "from oci\n1\n"


def test_oci_layout_with_traversal_is_refused_even_without_a_run_step(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", '[images.web]\nfrom = "oci:./evil"\n')
    _write_layout(project / "evil", [_tar({"../../etc/passwd": b"owned\n"})])
    with pytest.raises(
        KilnError, match=r"oci:./evil: layer sha256:[0-9a-f]{64}: entry '../../etc/passwd'"
    ):
        bake(load(project))
    assert index_refs(default_store()) == []
    assert not any(default_store().blobs.iterdir()), "nothing of the hostile image is stored"


def test_oci_layout_with_a_corrupt_blob_is_refused(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", '[images.web]\nfrom = "oci:./layout"\n')
    _write_layout(project / "layout", [_tar({"a": b"a"})])
    blob = max((project / "layout" / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    blob.write_bytes(blob.read_bytes() + b"x")
    with pytest.raises(KilnError, match=r"images.web.from: oci:./layout: blob sha256:.* hashes to"):
        bake(load(project))


def test_epoch_comes_from_a_clean_git_checkout(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dulwich import porcelain

    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    repo = porcelain.init(str(project))
    porcelain.add(repo, paths=[str(p) for p in project.rglob("*") if p.is_file() or p.is_symlink()])
    when = 1_600_000_000
    who = b"t <t@t>"
    porcelain.commit(
        repo,
        message=b"init",
        author=who,
        committer=who,
        commit_timestamp=when,
        author_timestamp=when,
    )
    facts = git_facts(project)
    assert facts.clean and facts.commit and facts.commit_time == 1_600_000_000
    assert source_date_epoch(project) == 1_600_000_000
    result = bake(load(project))["bb"]
    manifest = default_store().manifest(f"bb@{result.digest}")
    assert manifest["annotations"]["org.opencontainers.image.revision"] == facts.commit
    assert manifest["annotations"]["org.opencontainers.image.created"] == "2020-09-13T12:26:40Z"
    (project / "app" / "main.sh").write_text("dirty\n")
    assert source_date_epoch(project) == 0


_KILLABLE = """
import sys
from pathlib import Path
from kiln.image.bake import bake
from kiln.spec import load_spec
bake(load_spec(Path(sys.argv[1])))
"""


def test_killed_bake_tags_nothing_and_the_next_bake_cleans_staging(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "p",
        """
[images.slow]
from = "scratch"
steps = [{ copy = "rootfs/", to = "/" }, { run = "echo started; busybox sleep 30" }]
""",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(project / "kiln.toml")],
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 20
        while not any((d / "rootfs" / "bin").exists() for d in staging_dirs()):
            assert time.monotonic() < deadline, "the bake never reached its run step"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(staging_dirs()) == 1
    assert index_refs(default_store()) == []
    other = make_project(tmp_path / "q", BUSYBOX_RECIPE, files=APP_FILES)
    bake(load(other))
    assert staging_dirs() == []
    assert [ref.split(":")[0] for ref, _ in index_refs(default_store())] == ["bb"]


def test_skopeo_reads_the_baked_image(project: Path) -> None:
    import shutil

    if not shutil.which("skopeo"):
        pytest.skip("skopeo not installed")
    result = bake(load(project))["bb"]
    store = default_store()
    out = subprocess.run(
        ["skopeo", "inspect", f"oci:{store.root}:{result.ref_names[0]}"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["Digest"] == result.digest
    assert data["Env"] == ["APP=demo", "GREETING=hi"]


def test_stale_debian_trees_of_dead_bakes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """mmdebstrap's tree lives in the temp dir, so the sweep covers that prefix there too."""
    from kiln.image.bake import clean_stale_staging

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"kiln-debian-{dead_pid}-web-x1"
    live = tmp_path / f"kiln-debian-{os.getpid()}-web-x2"
    other = tmp_path / f"bake-{dead_pid}-web-x3"
    for path in (stale, live, other):
        (path / "rootfs" / "usr").mkdir(parents=True)
    clean_stale_staging(tmp_path, "kiln-debian-")
    assert (stale.exists(), live.exists(), other.exists()) == (False, True, True)
    clean_stale_staging(tmp_path)
    assert not other.exists()


# No run step, no binary: its digest is the same on every amd64 machine, root or not.
NO_RUN_STEPS = """
[images.known]
from = "scratch"
steps = [
  { copy = "app/", to = "/srv/app" },
  { copy = "app/main.sh", to = "/usr/local/bin/", chmod = "0755" },
  { env = { APP = "demo" } },
  { workdir = "/srv/app" },
]
cmd = ["/bin/sh", "main.sh"]
expose = [8080]
labels = { team = "core" }
"""
KNOWN_DIGEST = "sha256:9c9e24705778e7762324b5798beddb027eec7968fe4e136662529ad061f457b5"
WITH_A_RUN_STEP = """
[images.stepped]
from = "image:known"
steps = [
  { copy = "rootfs/", to = "/" },
  { run = "echo never" },
]
"""
NOBODY = 65534


def _line_of(project: Path, text: str) -> int:
    lines = (project / "kiln.toml").read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if text in line)


@pytest.mark.skipif(oci_architecture() != "amd64", reason="the digest names the architecture")
def test_a_recipe_without_run_steps_keeps_its_known_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    project = make_project(tmp_path / "known", NO_RUN_STEPS, files=APP_FILES)
    assert bake(load(project))["known"].digest == KNOWN_DIGEST


def _no_runc() -> str:
    raise KilnError("runc not found: install it (Debian: apt-get install runc)")


def test_without_runc_cached_run_steps_still_bake_and_one_that_must_run_fails_naming_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = bake(load(project))["bb"]
    store = default_store()
    before = index_refs(store)
    monkeypatch.setattr(sandbox, "runc_binary", _no_runc)
    again = bake(load(project))["bb"]
    assert (again.digest, again.layers_built) == (first.digest, 0)
    (project / "app" / "main.sh").write_text("echo changed\n")
    with pytest.raises(KilnError) as err:
        bake(load(project))
    line = _line_of(project, '{ run = "mkdir -p /etc;')
    assert str(err.value) == (
        f"kiln.toml:{line}: images.bb.steps[2].run: run steps execute in runc inside a user "
        "namespace, which needs root and runc (apt-get install runc); runc is not installed"
    )
    assert index_refs(store) == before
    assert staging_dirs() == []


def _as_nobody(job: Callable[[], object]) -> tuple[str, object]:
    """``job`` in a forked child whose uids and gids are all 65534: ("ok", its result),
    ("error", a KilnError's message) or ("crash", a traceback). It may import nothing
    new (the interpreter lies under /root), so the caller bakes the same way first."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out: tuple[str, object] = ("ok", job())
            except KilnError as e:
                out = ("error", str(e))
            except BaseException:
                out = ("crash", traceback.format_exc())
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = json.loads(data)
    return str(kind), value


def test_as_an_unprivileged_user_a_bake_without_run_steps_works_and_one_with_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    shared = Path(tempfile.mkdtemp(prefix="kiln-nobody-"))  # pytest's tmp_path is root's only
    try:
        os.chmod(shared, 0o755)
        project = make_project(shared / "project", NO_RUN_STEPS + WITH_A_RUN_STEP, files=APP_FILES)
        # As root every image bakes; this also imports all that the child will need.
        as_root = bake(load(project))["known"].digest
        home = shared / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        monkeypatch.setenv("KILN_HOME", str(home))

        kind, digest = _as_nobody(lambda: bake(load(project), ["known"])["known"].digest)
        assert (kind, digest) == ("ok", as_root)
        kind, message = _as_nobody(lambda: sorted(bake(load(project), ["stepped"])))
        line = _line_of(project, '{ run = "echo never" }')
        assert (kind, message) == (
            "error",
            f"kiln.toml:{line}: images.stepped.steps[1].run: {sandbox.STEPS_NEED}; "
            f"running as uid {NOBODY}",
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_run_step_that_needs_the_network_is_told_why_it_failed(tmp_path: Path) -> None:
    """Run steps are offline: a download fails, and the error says so and what to do."""
    project = make_project(
        tmp_path / "offline",
        """
[images.web]
from = "scratch"
steps = [
  { copy = "rootfs/", to = "/" },
  { run = "/bin/busybox wget -q -O /tmp/x http://deb.debian.org/ && echo fetched" },
]
""",
    )
    with pytest.raises(KilnError) as err:
        bake(load(project))
    message = str(err.value)
    assert message.startswith("images.web step 2 (run): exit 1\n"), message
    assert "hint: run steps have no network by default" in message, message
    assert "network = true" in message
