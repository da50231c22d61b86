import hashlib

import pytest

from kiln.errors import KilnError
from kiln.image.digest import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
    check_digest,
    sha256_hex,
)


def test_sha256_hex_is_bare_hex() -> None:
    assert sha256_hex(b"kiln") == hashlib.sha256(b"kiln").hexdigest()
    assert len(sha256_hex(b"")) == 64
    assert not sha256_hex(b"").startswith("sha256:")


def test_canonical_json_sorts_keys_and_keeps_unicode() -> None:
    data = canonical_json({"b": 1, "a": {"z": [1, 2], "y": "é"}})
    assert data == '{"a":{"y":"é","z":[1,2]},"b":1}'.encode()
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})


def test_media_types_are_the_oci_ones() -> None:
    assert MEDIA_TYPE_MANIFEST == "application/vnd.oci.image.manifest.v1+json"
    assert MEDIA_TYPE_INDEX == "application/vnd.oci.image.index.v1+json"
    assert MEDIA_TYPE_CONFIG == "application/vnd.oci.image.config.v1+json"
    assert MEDIA_TYPE_LAYER_GZIP == "application/vnd.oci.image.layer.v1.tar+gzip"


def test_descriptor_round_trips_with_oci_field_names() -> None:
    digest = "sha256:" + "ab" * 32
    desc = Descriptor(MEDIA_TYPE_MANIFEST, digest, 42, {"org.opencontainers.image.ref.name": "a:b"})
    data = desc.to_json()
    assert data == {
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": digest,
        "size": 42,
        "annotations": {"org.opencontainers.image.ref.name": "a:b"},
    }
    assert Descriptor.from_json(data) == desc
    bare = Descriptor(MEDIA_TYPE_CONFIG, digest, 1)
    assert "annotations" not in bare.to_json()
    assert Descriptor.from_json(bare.to_json()) == bare


@pytest.mark.parametrize(
    "bad", ["sha256:abc", "sha512:" + "a" * 64, "sha256:" + "A" * 64, "sha256:../../etc/passwd"]
)
def test_bad_digests_are_refused(bad: str) -> None:
    with pytest.raises(KilnError, match="not a sha256 digest"):
        check_digest(bad)
    with pytest.raises(KilnError, match="not a sha256 digest"):
        Descriptor.from_json({"mediaType": MEDIA_TYPE_CONFIG, "digest": bad, "size": 1})
