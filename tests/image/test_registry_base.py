"""``from = "registry:HOST/REPO:TAG"``: a base pulled from a real ``docker-registry`` (TLS from
a CA made here, htpasswd auth from ``[registries."HOST"]``), its tag pinned in ``kiln.lock``,
and hostile registries whose bases fail the bake and leave the store as it was.
"""

# ruff: noqa: F811 - the registry and hostile fixtures are imported by name and used as parameters

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest_bake import load, needs_busybox
from test_registry import (  # noqa: F401 - registry and hostile are fixtures
    HostileRegistry,
    Registry,
    hostile,
    make_image,
    needs_registry,
    registry,
    store_state,
    traversal_image,
)

from kiln.cli.app import run as kiln_run
from kiln.errors import KilnError
from kiln.image.bake import bake
from kiln.image.digest import Descriptor
from kiln.image.layer import layer_from_dir
from kiln.image.registry import push
from kiln.image.store import ImageStore
from kiln.spec.loader import load_spec


def project(root: Path, registry: Registry | None, base: str, extra: str = "") -> Path:
    """A project whose one recipe starts from ``base``; ``registry``'s CA and credentials are
    copied beside kiln.toml and named by relative paths, as a team would commit them."""
    root.mkdir(parents=True, exist_ok=True)
    access = ""
    if registry is not None:
        shutil.copy(registry.ca_file, root / "registry-ca.crt")
        shutil.copy(registry.auth_file, root / "registry.auth")
        access = (
            f'[registries."{registry.host}"]\n'
            'ca = "registry-ca.crt"\nauth_file = "registry.auth"\n\n'
        )
    (root / "greeting.txt").write_text("hello from the recipe\n")
    (root / "kiln.toml").write_text(
        '[project]\nname = "regbase"\n\n'
        + access
        + extra
        + f'[images.app]\nfrom = "{base}"\n'
        + 'steps = [{ copy = "greeting.txt", to = "/srv/greeting.txt" }]\n'
    )
    return root


def lock_pins(root: Path) -> dict[str, str]:
    data = tomllib.loads((root / "kiln.lock").read_text())
    return {k: v["digest"] for k, v in data.items() if k.startswith("registry:")}


def base_layers(store: ImageStore, digest: str) -> list[str]:
    manifest = store.read_json(digest)
    return [layer["digest"] for layer in manifest["layers"]]


@pytest.fixture
def source_store(tmp_path: Path) -> ImageStore:
    """Where the test builds the images it pushes: never the bake's store."""
    return ImageStore(tmp_path / "source-store")


@needs_registry
def test_tag_is_pinned_in_the_lock_and_a_moved_tag_changes_nothing_until_update(
    registry: Registry, source_store: ImageStore, store: ImageStore, tmp_path: Path
) -> None:
    first = make_image(source_store, tmp_path, "base:one")
    second = make_image(source_store, tmp_path, "base:two")
    options = registry.options()
    push(source_store, "base:one", f"{registry.host}/bases/app:v1", options)
    root = project(tmp_path / "proj", registry, f"registry:{registry.host}/bases/app:v1")
    key = f"registry:{registry.host}/bases/app:v1"

    baked = bake(load(root), store=store)["app"]
    assert lock_pins(root) == {key: first}
    pinned_layers = base_layers(source_store, first)
    layers = base_layers(store, baked.digest)
    assert layers[: len(pinned_layers)] == pinned_layers and len(layers) == 2
    config = store.read_json(store.read_json(baked.digest)["config"]["digest"])
    assert config["config"]["Cmd"] == ["/hello"]  # inherited from the base
    assert store.verify(baked.digest) == []

    push(source_store, "base:two", f"{registry.host}/bases/app:v1", options)  # the tag moves
    again = bake(load(root), store=store)["app"]
    assert again.digest == baked.digest
    assert lock_pins(root) == {key: first}

    fresh = ImageStore(tmp_path / "fresh-store")  # the pin is pulled by digest, not by tag
    assert bake(load(root), store=fresh)["app"].digest == baked.digest

    updated = bake(load(root), store=store, update_lock=True)["app"]
    assert lock_pins(root) == {key: second}
    assert base_layers(store, updated.digest)[0] == base_layers(source_store, second)[0]
    assert updated.digest != baked.digest


@needs_registry
def test_a_digest_base_needs_no_pin_and_the_lock_keeps_debian_tables(
    registry: Registry, source_store: ImageStore, store: ImageStore, tmp_path: Path
) -> None:
    digest = make_image(source_store, tmp_path, "base:digest")
    push(source_store, "base:digest", f"{registry.host}/bases/pinned:any", registry.options())
    root = project(tmp_path / "proj", registry, f"registry:{registry.host}/bases/pinned@{digest}")
    debian_table = (
        '["debian:bookworm/amd64"]\nsuite = "bookworm"\narchitecture = "amd64"\n'
        'requested = []\n\n["debian:bookworm/amd64".packages]\n"base-files" = "12.4"\n'
    )
    (root / "kiln.lock").write_text(debian_table)
    baked = bake(load(root), store=store)["app"]
    assert base_layers(store, baked.digest)[0] == base_layers(source_store, digest)[0]
    assert (root / "kiln.lock").read_text() == debian_table  # no pin for a digest


@needs_registry
@needs_busybox
def test_run_step_over_a_registry_base(
    registry: Registry,
    source_store: ImageStore,
    store: ImageStore,
    tmp_path: Path,
    busybox_tree: Callable[..., Path],
    image_builder: Callable[..., Descriptor],
) -> None:
    tree = busybox_tree(tmp_path / "bb", "from the registry")
    image_builder(source_store, [layer_from_dir(tree, source_store, 0)], "busybox:1")
    push(source_store, "busybox:1", f"{registry.host}/bases/busybox:1", registry.options())
    root = project(tmp_path / "proj", registry, f"registry:{registry.host}/bases/busybox:1")
    text = (root / "kiln.toml").read_text()
    (root / "kiln.toml").write_text(
        text.replace(
            'to = "/srv/greeting.txt" }]',
            'to = "/srv/greeting.txt" }, { run = "cat /etc/message > /srv/copied" }]',
        )
    )
    baked = bake(load(root), store=store)["app"]
    dest = tmp_path / "unpacked"
    assert kiln_run(["image", "unpack", baked.digest, str(dest)]) == 0
    assert (dest / "srv" / "copied").read_text() == "from the registry\n"


@needs_registry
def test_missing_repository_or_tag_is_one_line_naming_the_file_and_key(
    registry: Registry, store: ImageStore, tmp_path: Path
) -> None:
    bases = {"repo": "no/such:v1", "tag": "bases/app:no-such-tag"}
    for what, rest in bases.items():
        root = project(tmp_path / what, registry, f"registry:{registry.host}/{rest}")
        before = store_state(store)
        with pytest.raises(KilnError) as caught:
            bake(load(root), store=store)
        message = str(caught.value)
        assert message.startswith("kiln.toml: images.app.from: manifest "), message
        assert "not found at" in message and "\n" not in message
        assert not (root / "kiln.lock").exists()
        assert store_state(store) == before


@needs_registry
def test_wrong_credentials_in_the_registries_table_name_their_file(
    registry: Registry, store: ImageStore, tmp_path: Path
) -> None:
    root = project(tmp_path / "proj", registry, f"registry:{registry.host}/bases/app:v1")
    (root / "registry.auth").write_text("kiln:wrong\n")
    with pytest.raises(KilnError, match=r"unauthorized at .* \(credentials from .*registry\.auth"):
        bake(load(root), store=store)
    (root / "registry.auth").unlink()
    with pytest.raises(
        KilnError, match=r'^kiln\.toml: registries\."127\.0\.0\.1:\d+"\.auth_file: .* not a file'
    ):
        bake(load(root), store=store)


PLAIN = '[registries."{host}"]\nplain_http = true\n\n'


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("bad-digest", r"blob sha256:.* hashes to sha256:.*; refused"),
        ("truncated", r"blob sha256:.* truncated"),
        ("fail", r"failed \(500\) on manifest .*: disk on fire"),
    ],
)
def test_hostile_registry_fails_the_bake_and_stores_nothing(
    hostile: tuple[HostileRegistry, ImageStore],
    store: ImageStore,
    tmp_path: Path,
    behaviour: str,
    message: str,
) -> None:
    server, source = hostile
    server.serve_image("evil/base", source, "victim:1", behaviour)
    extra = PLAIN.format(host=server.host)
    root = project(tmp_path / "proj", None, f"registry:{server.host}/evil/base:1", extra)
    before = store_state(store)
    with pytest.raises(KilnError, match=r"^kiln\.toml: images\.app\.from: .*" + message):
        bake(load(root), store=store)
    assert store_state(store) == before
    assert not (root / "kiln.lock").exists()


def test_traversal_layer_is_refused_by_the_extractor_before_it_is_stored(
    hostile: tuple[HostileRegistry, ImageStore], store: ImageStore, tmp_path: Path
) -> None:
    server, _ = hostile
    evil = ImageStore(tmp_path / "evil-source")
    traversal_image(evil)
    server.serve_image("evil/escape", evil, "evil:1", "honest")
    extra = PLAIN.format(host=server.host)
    root = project(tmp_path / "proj", None, f"registry:{server.host}/evil/escape:1", extra)
    before = store_state(store)
    with pytest.raises(KilnError, match=r"^kiln\.toml: images\.app\.from: .*could escape the root"):
        bake(load(root), store=store)
    assert store_state(store) == before
    assert not (tmp_path / "escaped.txt").exists() and not (store.root / "escaped.txt").exists()
    assert not (root / "kiln.lock").exists()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[registries."registry.example:5000"]\nplain_http = true\n',
            r':\d+: registries\."registry\.example:5000"\.plain_http: is only allowed for a '
            r"registry on loopback",
        ),
        ('[registries."bad host"]\nca = "x"\n', r"registries"),
        (
            '[images.app]\nfrom = "registry:example/UPPER:1"\n',
            r":\d+: images\.app\.from: bad registry reference .* \(bad repository 'UPPER'",
        ),
        (
            '[images.app]\nfrom = "registry:nohost"\n',
            r"images\.app\.from: bad registry reference 'nohost'",
        ),
    ],
)
def test_spec_refuses_bad_registry_tables_and_references(
    tmp_path: Path, toml: str, message: str
) -> None:
    (tmp_path / "kiln.toml").write_text('[project]\nname = "t"\n\n' + toml)
    with pytest.raises(KilnError, match=message) as caught:
        load_spec(tmp_path)
    assert "\n" not in str(caught.value)


@needs_registry
def test_cli_push_and_pull_use_the_registries_table_without_flags(
    registry: Registry,
    store: ImageStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    digest = make_image(store, tmp_path, "cli-table:1")
    root = project(tmp_path / "proj", registry, "scratch")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    dest = f"{registry.host}/cli/table:1"
    assert kiln_run(["push", "cli-table:1", dest, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == digest
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "other-home"))
    assert kiln_run(["pull", dest]) == 0
    assert digest in capsys.readouterr().out
    (root / "kiln.toml").write_text('[project]\nname = "regbase"\n')
    assert kiln_run(["pull", dest]) == 1  # without the table: no CA, no credentials
    assert "certificate not trusted" in capsys.readouterr().err
