"""An image's evidence through a registry: push its referrers (the real SBOM of the image,
and a signature-like artifact on that SBOM) to a real ``docker-registry`` 2.8 with TLS and
htpasswd, which has no referrers API, so the tag-schema fallback is what carries them;
pull them into a fresh store byte for byte; and a hostile registry whose evidence is for
another image, tampered, or a flood: refused with one warning each, nothing of it stored.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_registry import (
    PASSWORD,
    USER,
    Registry,
    make_image,
    needs_registry,
)
from test_registry import registry as registry  # the fixture: a real TLS docker-registry

from kiln.cli.app import run as kiln_run
from kiln.errors import KilnError
from kiln.image.digest import MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, Descriptor
from kiln.image.referrer_transfer import MAX_REFERRERS, fallback_tag
from kiln.image.registry import RegistryClient, RegistryOptions, pull, push
from kiln.image.store import ImageStore
from kiln.supply.sbom import SBOM_ARTIFACT_TYPE, ensure_sbom, stored_sbom

SIG_TYPE = "application/vnd.dev.kiln.test-signature.v1+json"


def image_with_evidence(store: ImageStore, root: Path, name: str) -> tuple[str, list[str]]:
    """An image, its real SBOM, and an artifact whose subject is that SBOM."""
    digest = make_image(store, root, name, payload_bytes=20_000)
    sbom = ensure_sbom(store, name)
    assert sbom is not None
    signature = store.put_referrer(
        sbom.digest, SIG_TYPE, b'{"sig":"over the sbom"}', SIG_TYPE, {"kiln.test": "sig"}
    )
    return digest, [sbom.digest, signature.digest]


def raw_get(client: RegistryClient, path: str, repo: str) -> tuple[int, bytes]:
    answer = client.send(
        "GET",
        path,
        scope=f"repository:{repo}:pull",
        headers={"Accept": f"{MEDIA_TYPE_INDEX}, {MEDIA_TYPE_MANIFEST}"},
        stream=True,
    )
    try:
        return answer.status_code, answer.read()
    finally:
        answer.close()


# -- the real registry ------------------------------------------------------------


@needs_registry
def test_referrers_travel_through_a_registry_byte_identical(
    registry: Registry, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "a")
    digest, (sbom, signature) = image_with_evidence(store, tmp_path, "ev:1")
    with RegistryClient(registry.host, registry.options()) as client:
        result = push(store, "ev:1", f"{registry.host}/team/ev:1", client=client, referrers=True)
        assert result.referrers == [sbom, signature]
        assert sorted(result.fallback_tags) == sorted([fallback_tag(digest), fallback_tag(sbom)])
        # docker-registry 2.8 has no referrers API: that is why the fallback tag exists
        status, _ = raw_get(client, f"/v2/team/ev/referrers/{digest}", "team/ev")
        assert status == 404
        status, body = raw_get(client, f"/v2/team/ev/manifests/{fallback_tag(digest)}", "team/ev")
    assert status == 200
    index = json.loads(body)
    assert index["mediaType"] == MEDIA_TYPE_INDEX
    assert [m["digest"] for m in index["manifests"]] == [sbom]
    assert index["manifests"][0]["artifactType"] == SBOM_ARTIFACT_TYPE
    assert index["manifests"][0]["annotations"] == store.referrers(digest)[0].annotations

    inspect = subprocess.run(
        [
            *("skopeo", "inspect", "--raw", "--cert-dir", str(registry.cert_dir)),
            *("--creds", f"{USER}:{PASSWORD}"),
            f"docker://{registry.host}/team/ev:{fallback_tag(sbom)}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0, inspect.stderr
    listed = json.loads(inspect.stdout)["manifests"]
    assert [(m["digest"], m["artifactType"]) for m in listed] == [(signature, SIG_TYPE)]

    fresh = ImageStore(tmp_path / "b")
    pulled = pull(fresh, f"{registry.host}/team/ev:1", registry.options(), referrers=True)
    assert pulled.digest == digest
    assert pulled.referrers == [sbom, signature] and not pulled.referrers_refused
    assert fresh.referrer_closure([digest]) == store.referrer_closure([digest])
    for artifact in (sbom, signature):
        assert fresh.read_bytes(artifact) == store.read_bytes(artifact)
        assert fresh.read_referrer(artifact) == store.read_referrer(artifact)
    assert stored_sbom(fresh, "team/ev:1") == stored_sbom(store, "ev:1")
    assert fresh.gc().removed_blobs == 0, "gc keeps pulled evidence with its image"

    again = pull(fresh, f"{registry.host}/team/ev:1", registry.options(), referrers=True)
    assert again.referrers == [] and again.referrers_present == [sbom, signature]


@needs_registry
def test_a_second_push_merges_the_fallback_index_without_duplicates(
    registry: Registry, tmp_path: Path
) -> None:
    """Two stores add evidence to one image: each push reads the fallback index, adds what
    it lacks and writes it back; nothing listed twice, nothing another client wrote lost."""
    first = ImageStore(tmp_path / "first")
    digest, (sbom, _) = image_with_evidence(first, tmp_path, "merge:1")
    dest = f"{registry.host}/team/merge:1"
    push(first, "merge:1", dest, registry.options(), referrers=True)
    second = ImageStore(tmp_path / "second")
    pull(second, dest, registry.options(), referrers=True)
    theirs = second.put_referrer("team/merge:1", SIG_TYPE, b'{"sig":"second"}', SIG_TYPE)
    with RegistryClient(registry.host, registry.options()) as client:
        pushed = push(second, "team/merge:1", dest, client=client, referrers=True)
        assert pushed.referrers == [theirs.digest]
        assert pushed.fallback_tags == [fallback_tag(digest)]
        again = push(first, "merge:1", dest, client=client, referrers=True)
        assert again.referrers == [] and again.fallback_tags == []
        assert len(again.referrers_present) == 2
        ours = first.put_referrer("merge:1", SIG_TYPE, b'{"sig":"first, later"}', SIG_TYPE)
        last = push(first, "merge:1", dest, client=client, referrers=True)
        assert last.referrers == [ours.digest]
        _, body = raw_get(client, f"/v2/team/merge/manifests/{fallback_tag(digest)}", "team/merge")
    assert [m["digest"] for m in json.loads(body)["manifests"]] == [
        sbom,
        theirs.digest,
        ours.digest,
    ]


@needs_registry
def test_cli_no_referrers_and_the_counts(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ImageStore.default()
    digest, evidence = image_with_evidence(store, tmp_path, "flag:1")
    common = ["--ca", str(registry.ca_file), "--auth-file", str(registry.auth_file)]
    dest = f"{registry.host}/team/flag:1"
    assert kiln_run(["push", "flag:1", dest, "--no-referrers", *common]) == 0
    assert capsys.readouterr().out.endswith("0 referrers (0 new)\n")
    with RegistryClient(registry.host, registry.options()) as client:
        status, _ = raw_get(client, f"/v2/team/flag/manifests/{fallback_tag(digest)}", "team/flag")
    assert status == 404, "--no-referrers left no fallback tag"

    assert kiln_run(["push", "flag:1", dest, *common]) == 0
    assert capsys.readouterr().out.endswith("2 referrers (2 new)\n")
    store.remove("flag:1")
    store.gc()
    assert kiln_run(["pull", dest, "--no-referrers", *common]) == 0
    assert capsys.readouterr().out.endswith("0 referrers (0 new)\n")
    assert ImageStore.default().referrers(digest) == []
    assert kiln_run(["pull", dest, *common]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("2 referrers (2 new)\n") and captured.err == ""
    assert [d.digest for d in ImageStore.default().referrer_closure([digest])] == evidence


# -- a hostile registry -------------------------------------------------------------


class StaticRegistry:
    """Plain HTTP on loopback answering GET/HEAD from a table of exact bytes per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                return

            def do_GET(self) -> None:
                outer.answer(self)

            do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        self.hits.append(path)
        body, media_type = self.routes.get(path, (b'{"errors":[{"code":"NOT_FOUND"}]}', ""))
        h.send_response(200 if path in self.routes else 404)
        h.send_header("Content-Type", media_type or "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(body)

    def serve_manifest(self, repo: str, store: ImageStore, digest: str, *tags: str) -> None:
        """A manifest under its digest and ``tags``, with every blob it names."""
        data = store.read_bytes(digest)
        manifest = json.loads(data)
        for ref in (digest, *tags):
            self.routes[f"/v2/{repo}/manifests/{ref}"] = (data, MEDIA_TYPE_MANIFEST)
        for item in [manifest["config"], *manifest["layers"]]:
            self.routes[f"/v2/{repo}/blobs/{item['digest']}"] = (
                store.read_bytes(item["digest"]),
                "",
            )

    def serve_listing(self, repo: str, subject: str, entries: list[Any], *, api: bool) -> None:
        index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": entries}
        path = f"referrers/{subject}" if api else f"manifests/{fallback_tag(subject)}"
        self.routes[f"/v2/{repo}/{path}"] = (json.dumps(index).encode(), MEDIA_TYPE_INDEX)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[StaticRegistry, ImageStore, str, list[str]]]:
    server = StaticRegistry()
    source = ImageStore(tmp_path / "source")
    digest, evidence = image_with_evidence(source, tmp_path, "victim:1")
    server.serve_manifest("evil/app", source, digest, "1")
    for artifact in evidence:
        server.serve_manifest("evil/app", source, artifact)
    try:
        yield server, source, digest, evidence
    finally:
        server.close()


PLAIN = RegistryOptions(plain_http=True)


def image_only(store: ImageStore, digest: str) -> set[str]:
    manifest = json.loads(store.read_bytes(digest))
    blobs = [digest, manifest["config"]["digest"], *(m["digest"] for m in manifest["layers"])]
    return {b.removeprefix("sha256:") for b in blobs}


def test_the_referrers_api_is_used_when_the_registry_has_it(
    served: tuple[StaticRegistry, ImageStore, str, list[str]], tmp_path: Path
) -> None:
    server, source, digest, (sbom, signature) = served
    server.serve_listing("evil/app", digest, [source.referrers(digest)[0].to_json()], api=True)
    server.serve_listing("evil/app", sbom, [source.referrers(sbom)[0].to_json()], api=True)
    target = ImageStore(tmp_path / "t")
    result = pull(target, f"{server.host}/evil/app:1", PLAIN, referrers=True)
    assert result.referrers == [sbom, signature] and not result.referrers_refused
    assert f"/v2/evil/app/manifests/{fallback_tag(digest)}" not in server.hits
    assert target.read_referrer(signature) == source.read_referrer(signature)


def test_a_referrer_of_another_image_is_refused_and_not_stored(
    served: tuple[StaticRegistry, ImageStore, str, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, source, digest, _ = served
    other_digest = make_image(source, tmp_path, "other:1", payload_bytes=1000)
    foreign = source.put_referrer("other:1", SIG_TYPE, b'{"sig":"for the other one"}', SIG_TYPE)
    server.serve_manifest("evil/app", source, foreign.digest)
    server.serve_listing("evil/app", digest, [foreign.to_json()], api=False)
    code = kiln_run(["pull", f"{server.host}/evil/app:1", "--plain-http"])
    captured = capsys.readouterr()
    assert code == 0, "the image itself is verified and pulled"
    assert captured.err == (
        f"warning: referrer {foreign.digest[:19]}… refused: its subject is {other_digest}, "
        f"not {digest}; not stored\n"
    )
    assert captured.out.endswith("0 referrers (0 new, 1 refused)\n")
    store = ImageStore.default()
    assert store.resolve("evil/app:1").digest == digest
    assert store.referrers(digest) == []
    assert {p.name for p in store.blobs.iterdir()} == image_only(store, digest)


def test_a_referrer_blob_with_a_wrong_digest_is_refused_and_not_stored(
    served: tuple[StaticRegistry, ImageStore, str, list[str]], tmp_path: Path
) -> None:
    server, source, digest, (sbom, _) = served
    server.serve_listing("evil/app", digest, [source.referrers(digest)[0].to_json()], api=False)
    payload = Descriptor.from_json(source.read_json(sbom)["layers"][0])
    path = f"/v2/evil/app/blobs/{payload.digest}"
    honest, media_type = server.routes[path]
    server.routes[path] = (honest[:-1] + b" ", media_type)
    target = ImageStore(tmp_path / "t")
    warnings: list[str] = []
    result = pull(target, f"{server.host}/evil/app:1", PLAIN, referrers=True, warn=warnings.append)
    assert result.digest == digest and result.referrers == []
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: referrer {sbom[:19]}… refused")
    assert f"blob {payload.digest[:19]}… of {server.host}/evil/app hashes to" in warnings[0]
    assert target.referrers(digest) == []
    assert {p.name for p in target.blobs.iterdir()} == image_only(target, digest)
    assert list(target.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (100_000, r"manifest .*:sha256-[0-9a-f]{64} is \d+ bytes; refused \(limit 4194304\)"),
        (MAX_REFERRERS + 1, rf"lists {MAX_REFERRERS + 1}; refused \(limit {MAX_REFERRERS}\)"),
    ],
)
def test_a_flood_of_referrers_is_refused_and_nothing_of_it_stored(
    served: tuple[StaticRegistry, ImageStore, str, list[str]],
    tmp_path: Path,
    entries: int,
    message: str,
) -> None:
    server, source, digest, _ = served
    real = source.referrers(digest)[0].to_json()
    flood = [
        {**real, "digest": f"sha256:{n:064x}", "annotations": {"n": str(n)}} for n in range(entries)
    ]
    server.serve_listing("evil/app", digest, flood, api=False)
    target = ImageStore(tmp_path / "t")
    warnings: list[str] = []
    result = pull(target, f"{server.host}/evil/app:1", PLAIN, referrers=True, warn=warnings.append)
    assert result.digest == digest and result.referrers == []
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: referrers of {digest[:19]}…")
    assert re.search(message, warnings[0]), warnings[0]
    assert target.referrers(digest) == []
    assert {p.name for p in target.blobs.iterdir()} == image_only(target, digest)
    assert not any(p.startswith("/v2/evil/app/manifests/sha256:0000") for p in server.hits)


def test_a_non_index_at_the_fallback_tag_means_no_referrers(
    served: tuple[StaticRegistry, ImageStore, str, list[str]], tmp_path: Path
) -> None:
    server, source, digest, _ = served
    server.serve_manifest("evil/app", source, digest, fallback_tag(digest))
    target = ImageStore(tmp_path / "t")
    warnings: list[str] = []
    result = pull(target, f"{server.host}/evil/app:1", PLAIN, referrers=True, warn=warnings.append)
    assert result.digest == digest and result.referrers == [] and warnings == []


def test_add_referrer_manifest_keeps_exact_bytes_and_refuses_what_is_not_here(
    tmp_path: Path,
) -> None:
    source = ImageStore(tmp_path / "source")
    digest, (sbom, _) = image_with_evidence(source, tmp_path, "exact:1")
    target = ImageStore(tmp_path / "target")
    original = source.read_bytes(sbom)
    manifest = json.loads(original)
    spaced = json.dumps(manifest, indent=3).encode()  # not canonical: must stay as it is
    with pytest.raises(KilnError, match=f"its subject {digest} is not here"):
        target.add_referrer_manifest(spaced)
    make_blobs = [manifest["config"], *manifest["layers"]]
    image_manifest = json.loads(source.read_bytes(digest))
    for item in [image_manifest["config"], *image_manifest["layers"]]:
        target.put_bytes(source.read_bytes(item["digest"]), item["mediaType"])
    target.put_bytes(source.read_bytes(digest), MEDIA_TYPE_MANIFEST)
    with pytest.raises(KilnError, match=r"blob sha256:[0-9a-f]{64} is not here"):
        target.add_referrer_manifest(spaced)
    for item in make_blobs:
        target.put_bytes(source.read_bytes(item["digest"]), item["mediaType"])
    for bad, message in [
        (b"[]", "not an artifact manifest"),
        (json.dumps({**manifest, "mediaType": MEDIA_TYPE_INDEX}).encode(), "not an OCI image"),
        (json.dumps({**manifest, "subject": {**manifest["subject"], "size": 1}}).encode(), "size"),
        (json.dumps({**manifest, "artifactType": "no-slash"}).encode(), "bad artifact type"),
    ]:
        with pytest.raises(KilnError, match=message):
            target.add_referrer_manifest(bad)
    assert target.referrers(digest) == []
    entry = target.add_referrer_manifest(spaced)
    assert target.read_bytes(entry.digest) == spaced
    assert entry.artifact_type == SBOM_ARTIFACT_TYPE
    assert [d.digest for d in target.referrers(digest)] == [entry.digest]
    assert target.add_referrer_manifest(spaced) == entry
    assert len(target.referrers(digest)) == 1, "recorded once"
