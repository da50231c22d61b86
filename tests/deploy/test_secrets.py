from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kiln.deploy.secrets import MAGIC, MAX_SECRET_BYTES, SecretStore
from kiln.errors import KilnError


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_SECRET_KEY", raising=False)


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(tmp_path / "secrets")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_each_new_value_is_the_next_version_and_old_ones_stay_readable(
    store: SecretStore,
) -> None:
    assert store.current("api_key") is None
    assert store.set("api_key", b"one") == "v1"
    assert store.set("api_key", b"two") == "v2"
    assert store.current("api_key") == "v2"
    assert store.read("api_key", "v1") == b"one"
    assert store.read("api_key", "v2") == b"two"


def test_setting_the_current_value_again_is_a_no_op(store: SecretStore) -> None:
    assert store.set("api_key", b"one") == "v1"
    before = (store.root / "api_key" / "current.json").read_bytes()
    assert store.set("api_key", b"one") == "v1"
    assert (store.root / "api_key" / "current.json").read_bytes() == before
    assert sorted(p.name for p in (store.root / "api_key").glob("v*")) == ["v1"]
    assert store.set("api_key", b"two") == "v2"
    assert store.set("api_key", b"one") == "v3"


def test_versions_are_immutable_files_with_private_permissions(store: SecretStore) -> None:
    store.set("db.password", b"hunter2")
    store.set("db.password", b"hunter3")
    assert mode(store.root) == 0o700
    assert mode(store.root / "db.password") == 0o700
    for path in [*store.root.iterdir(), *(store.root / "db.password").iterdir()]:
        if path.is_file():
            assert mode(path) == 0o600, path
    assert (store.root / "db.password" / "v1").read_bytes().startswith(MAGIC)
    assert not [p for p in (store.root / "db.password").iterdir() if p.name.startswith(".tmp")]


def test_the_store_root_is_made_private_even_when_it_existed(tmp_path: Path) -> None:
    root = tmp_path / "secrets"
    root.mkdir(mode=0o755)
    SecretStore(root).set("k", b"v")
    assert mode(root) == 0o700


def test_opening_a_store_creates_nothing(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets")
    assert store.list() == []
    assert store.current("k") is None
    assert not (tmp_path / "secrets").exists()


def test_list_shows_names_and_versions_never_values(store: SecretStore) -> None:
    store.set("b", b"value-b")
    store.set("a", b"value-a1")
    store.set("a", b"value-a2")
    infos = store.list()
    assert [(i.name, i.version) for i in infos] == [("a", "v2"), ("b", "v1")]
    assert all(i.updated > 0 for i in infos)
    assert "value" not in repr(infos) and "value" not in repr([i.to_json() for i in infos])


@pytest.mark.parametrize("name", ["API_KEY", "", "-x", ".hidden", "a/b", "..", "a b", "é"])
def test_bad_names_are_refused(store: SecretStore, name: str) -> None:
    with pytest.raises(KilnError, match="is not a valid secret name"):
        store.set(name, b"v")


def test_values_over_one_mebibyte_and_empty_ones_are_refused(store: SecretStore) -> None:
    assert store.set("big", b"x" * MAX_SECRET_BYTES) == "v1"
    with pytest.raises(KilnError, match=r"secret big: 1048577 bytes is over the limit"):
        store.set("big", b"x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(KilnError, match="secret e: the value is empty"):
        store.set("e", b"")
    assert store.current("big") == "v1"


def test_versions_for_names_the_service_and_the_command_that_fixes_it(
    store: SecretStore,
) -> None:
    store.set("db", b"x")
    assert store.versions_for({"web": ["db"], "worker": []}) == {"db": "v1"}
    with pytest.raises(KilnError) as e:
        store.versions_for({"web": ["db", "api_key"]})
    home = store.root.parent  # the home is named: a secret set in another one is the trap
    assert str(e.value) == (
        f"services.web.secrets: secret api_key is not set in KILN_HOME {home}; "
        f"set it with: KILN_HOME={home} kiln secret set api_key"
    )
    with pytest.raises(KilnError, match=r"services.web.secrets: 'Bad' is not a valid"):
        store.versions_for({"web": ["Bad"]})


def test_remove_deletes_every_value_and_never_reuses_a_version(store: SecretStore) -> None:
    store.set("k", b"old")
    store.set("k", b"older")
    store.remove("k")
    assert store.current("k") is None
    assert store.list() == []
    assert not list((store.root / "k").glob("v*"))
    with pytest.raises(KilnError, match=r"secret k v1 is not in the secret store .*kiln secret"):
        store.read("k", "v1")
    assert store.set("k", b"new") == "v3"
    with pytest.raises(KilnError, match="secret nope is not set"):
        store.remove("nope")


def test_values_for_reads_what_a_revision_pins_or_says_what_is_missing(
    store: SecretStore,
) -> None:
    store.set("a", b"1")
    store.set("a", b"2")
    assert store.values_for({"a": "v1"}) == {"a": b"1"}
    assert store.values_for({}) == {}
    with pytest.raises(KilnError, match="secret a v7 is not in the secret store"):
        store.values_for({"a": "v7"})
    with pytest.raises(KilnError, match="secret a: the revision pins no version"):
        store.values_for({"a": ""})
    with pytest.raises(KilnError, match="is not a version"):
        store.read("a", "../a/v1")


def test_a_version_left_without_current_json_is_not_reused(store: SecretStore) -> None:
    """A crash between writing the value and current.json must not make v2 mean two values."""
    store.set("k", b"one")
    before = (store.root / "k" / "current.json").read_bytes()
    store.set("k", b"orphan")
    (store.root / "k" / "current.json").write_bytes(before)  # as if we died before it
    assert store.current("k") == "v1"
    assert store.set("k", b"two") == "v3"
    assert store.read("k", "v2") == b"orphan"


def test_concurrent_writers_each_get_their_own_version(store: SecretStore) -> None:
    got: list[str] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        version = store.set("k", f"value-{i}".encode())
        with lock:
            got.append(version)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 9)]
    values = {store.read("k", v) for v in got}
    assert values == {f"value-{i}".encode() for i in range(8)}


# Encryption at rest. The helpers below read the documented format on their own
# (KILNSEC1 + 12-byte nonce + AES-256-GCM ciphertext and tag, associated data
# b"kiln-secret\0NAME\0VERSION"), so the tests check the format, not just a round trip.

VALUE = b"correct horse battery staple \x00\xff 7Qk2"
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def store_key(root: Path) -> bytes:
    return base64.b64decode((root / ".key").read_text().strip(), validate=True)


def decrypts_to(key: bytes, data: bytes, name: str, version: str) -> bytes | None:
    if not data.startswith(b"KILNSEC1"):
        return None
    try:
        return AESGCM(key).decrypt(
            data[8:20], data[20:], b"kiln-secret\0" + name.encode() + b"\0" + version.encode()
        )
    except InvalidTag:
        return None


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def encodings(value: bytes) -> list[bytes]:
    return [
        value,
        value.hex().encode(),
        value.hex().upper().encode(),
        base64.b64encode(value),
        base64.urlsafe_b64encode(value),
        base64.b32encode(value),
    ]


def write_old_store(root: Path, values: dict[str, list[bytes]]) -> None:
    """A store as the clear-text Kiln wrote it: <name>/vN raw bytes and current.json."""
    root.mkdir(mode=0o700)
    for name, versions in values.items():
        directory = root / name
        directory.mkdir(mode=0o700)
        (directory / ".lock").touch(mode=0o600)
        for n, value in enumerate(versions, 1):
            (directory / f"v{n}").write_bytes(value)
            (directory / f"v{n}").chmod(0o600)
        record = {"version": f"v{len(versions)}", "serial": len(versions), "updated": 1.0}
        (directory / "current.json").write_text(json.dumps(record))


def test_values_round_trip_and_are_stored_in_the_documented_format(store: SecretStore) -> None:
    big = os.urandom(MAX_SECRET_BYTES)
    assert store.set("api_key", VALUE) == "v1"
    assert store.set("api_key", big) == "v2"
    assert SecretStore(store.root).values_for({"api_key": "v1"}) == {"api_key": VALUE}
    assert SecretStore(store.root).read("api_key", "v2") == big
    key = store_key(store.root)
    data = (store.root / "api_key" / "v1").read_bytes()
    assert len(data) == 8 + 12 + len(VALUE) + 16
    assert decrypts_to(key, data, "api_key", "v1") == VALUE
    nonces = {(store.root / "api_key" / v).read_bytes()[8:20] for v in ("v1", "v2")}
    assert len(nonces) == 2


def test_no_file_in_the_store_holds_the_value_in_any_common_encoding(
    store: SecretStore, tmp_path: Path
) -> None:
    store.set("api_key", VALUE)
    store.set("api_key", VALUE + b"2")
    store.read("api_key", "v1")
    stored = files(tmp_path)
    assert "secrets/.key" in stored and "secrets/api_key/v1" in stored
    for path, data in stored.items():
        for needle in encodings(VALUE):
            assert needle not in data, (path, needle)


@pytest.mark.parametrize(
    ("source", "target"),
    [(("a", "v1"), ("b", "v1")), (("a", "v1"), ("a", "v2")), (("a", "v2"), ("a", "v1"))],
)
def test_a_file_moved_to_another_name_or_version_does_not_decrypt(
    store: SecretStore, source: tuple[str, str], target: tuple[str, str]
) -> None:
    store.set("a", b"value-a1")
    store.set("a", b"value-a2")
    store.set("b", b"value-b1")
    src = store.root / source[0] / source[1]
    dst = store.root / target[0] / target[1]
    dst.write_bytes(src.read_bytes())
    name, version = target
    for reader in (store, SecretStore(store.root)):
        with pytest.raises(KilnError) as e:
            reader.values_for({name: version})
        message = str(e.value)
        assert message.startswith(
            f"secret {name} {version}: cannot decrypt: "
            "wrong key or the file was tampered with / moved (the key is the key file "
        )
        assert "value-" not in message
    assert store.read(*source) == f"value-{source[0]}{source[1][1]}".encode()


@pytest.mark.parametrize("where", [0, 7, 8, 19, 20, -17, -1])
def test_a_flipped_byte_anywhere_fails_clearly(store: SecretStore, where: int) -> None:
    """Magic, nonce, ciphertext, tag: even a file that no longer looks encrypted is refused."""
    store.set("k", b"the value")
    path = store.root / "k" / "v1"
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(KilnError, match=r"^secret k v1: cannot decrypt: wrong key or the file"):
        SecretStore(store.root).read("k", "v1")
    with pytest.raises(KilnError, match="cannot decrypt"):
        store.set("k", b"another")  # the no-op check reads the current value
    assert path.read_bytes() == bytes(data)


def test_a_truncated_or_empty_value_file_fails_clearly(store: SecretStore) -> None:
    store.set("k", b"the value")
    path = store.root / "k" / "v1"
    for data in (path.read_bytes()[:30], b"KILNSEC1", b""):
        path.write_bytes(data)
        with pytest.raises(KilnError, match="secret k v1: cannot decrypt"):
            SecretStore(store.root).read("k", "v1")


def test_a_wrong_kiln_secret_key_fails_clearly_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "secrets"
    monkeypatch.setenv("KILN_SECRET_KEY", b64(KEY_A))
    SecretStore(root).set("api_key", VALUE)
    assert not (root / ".key").exists(), "no key file when the key comes from the environment"
    assert decrypts_to(KEY_A, (root / "api_key" / "v1").read_bytes(), "api_key", "v1") == VALUE
    before = files(root)

    monkeypatch.setenv("KILN_SECRET_KEY", KEY_B.hex())
    attempts = [
        lambda s: s.read("api_key", "v1"),
        lambda s: s.values_for({"api_key": "v1"}),
        lambda s: s.set("api_key", b"new value"),
        lambda s: s.set("api_key", VALUE),
        lambda s: s.set("other", b"new value"),
    ]
    for attempt in attempts:
        with pytest.raises(KilnError) as e:
            attempt(SecretStore(root))
        message = str(e.value)
        assert message.startswith("secret ") and "cannot decrypt: KILN_SECRET_KEY is not the key"
        assert "set KILN_SECRET_KEY to the key the store was written with" in message
        assert "nothing was changed" in message
        assert b64(KEY_B) not in message and KEY_B.hex() not in message
    assert files(root) == before
    assert not (root / "other").exists() and not (root / ".key").exists()

    monkeypatch.setenv("KILN_SECRET_KEY", KEY_A.hex())  # the same key, in hex
    assert SecretStore(root).read("api_key", "v1") == VALUE
    monkeypatch.delenv("KILN_SECRET_KEY")
    with pytest.raises(KilnError, match=r"is encrypted but its key file .*\.key is missing"):
        SecretStore(root).read("api_key", "v1")
    assert not (root / ".key").exists()


def test_an_environment_key_that_differs_from_the_key_file_says_where_keys_come_from(
    store: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.set("api_key", VALUE)
    monkeypatch.setenv("KILN_SECRET_KEY", b64(KEY_B))
    with pytest.raises(KilnError) as e:
        SecretStore(store.root).read("api_key", "v1")
    assert str(e.value) == (
        f"secret api_key v1: cannot decrypt: KILN_SECRET_KEY is not the key of the secret "
        f"store {store.root}; set KILN_SECRET_KEY to the key the store was written with, or "
        f"unset it to use the key file {store.root / '.key'}; nothing was changed"
    )
    monkeypatch.setenv("KILN_SECRET_KEY", (store.root / ".key").read_text())
    assert SecretStore(store.root).read("api_key", "v1") == VALUE


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "hunter2",
        KEY_A.hex()[:-2],
        KEY_A.hex() + "00",
        "zz" * 32,
        b64(KEY_A[:16]),
        b64(KEY_A + b"!"),
        b64(KEY_A)[:-1] + "*",
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),
        "clé" * 15,
    ],
)
def test_a_malformed_kiln_secret_key_is_refused_without_echoing_it(
    store: SecretStore, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("KILN_SECRET_KEY", bad)
    with pytest.raises(KilnError) as e:
        store.set("api_key", VALUE)
    message = str(e.value)
    assert message.startswith(
        "secret api_key: KILN_SECRET_KEY is not a secret key: it must be 64 hex digits or "
        "the base64 of 32 random bytes"
    )
    assert not bad or bad not in message
    assert store.current("api_key") is None


def test_hex_and_base64_name_the_same_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "secrets"
    monkeypatch.setenv("KILN_SECRET_KEY", KEY_A.hex().upper())
    SecretStore(root).set("k", b"v")
    monkeypatch.setenv("KILN_SECRET_KEY", f"  {b64(KEY_A)}\n")
    assert SecretStore(root).read("k", "v1") == b"v"


def test_the_key_file_is_made_private_and_a_readable_one_is_refused(store: SecretStore) -> None:
    store.set("api_key", VALUE)
    key_file = store.root / ".key"
    assert mode(key_file) == 0o600 and mode(store.root) == 0o700
    assert key_file.stat().st_uid == os.geteuid()
    assert len(store_key(store.root)) == 32
    original = key_file.read_bytes()

    key_file.chmod(0o644)
    with pytest.raises(KilnError) as e:
        SecretStore(store.root).read("api_key", "v1")
    assert str(e.value).startswith(
        f"secret api_key v1: permissions 0644 for key file {key_file} are too open: "
        "it must be readable by its owner only; refusing to use it"
    )
    key_file.chmod(0o640)
    with pytest.raises(KilnError, match="permissions 0640 for key file"):
        SecretStore(store.root).set("other", b"x")
    assert key_file.read_bytes() == original and mode(key_file) == 0o640
    assert not (store.root / "other").exists()
    key_file.chmod(0o400)
    assert SecretStore(store.root).read("api_key", "v1") == VALUE


def test_a_key_file_of_another_owner_or_a_symlink_is_refused(store: SecretStore) -> None:
    store.set("api_key", VALUE)
    key_file = store.root / ".key"
    real = store.root.parent / "real.key"
    key_file.rename(real)
    key_file.symlink_to(real)
    with pytest.raises(KilnError, match=r"key file .*\.key: .*; refusing to use it"):
        SecretStore(store.root).read("api_key", "v1")
    key_file.unlink()
    real.rename(key_file)
    if os.geteuid() == 0:
        os.chown(key_file, 65534, 65534)
        with pytest.raises(KilnError, match=r"is owned by uid 65534, not by uid 0 that runs kiln"):
            SecretStore(store.root).read("api_key", "v1")
        os.chown(key_file, 0, 0)
    assert SecretStore(store.root).read("api_key", "v1") == VALUE


def test_a_clear_text_store_is_encrypted_in_place_on_first_use(tmp_path: Path) -> None:
    root = tmp_path / "secrets"
    old = {"api_key": [b"first-clear-value", b"second-clear-value"], "db": [b"db-clear-pw"]}
    write_old_store(root, old)
    (root / "api_key" / ".tmp-crashed").write_bytes(b"second-clear-value")

    store = SecretStore(root)
    assert [(i.name, i.version) for i in store.list()] == [("api_key", "v2"), ("db", "v1")]
    assert not (root / ".key").exists(), "listing needs no key and migrates nothing"
    assert store.read("db", "v1") == b"db-clear-pw"

    key = store_key(root)
    for name, values in old.items():
        for n, value in enumerate(values, 1):
            data = (root / name / f"v{n}").read_bytes()
            assert decrypts_to(key, data, name, f"v{n}") == value
            assert SecretStore(root).read(name, f"v{n}") == value
    assert not list(root.rglob(".tmp-*"))
    for path, data in files(root).items():
        for values in old.values():
            for value in values:
                assert value not in data, path
    assert store.set("api_key", b"second-clear-value") == "v2", "the no-op rule still holds"
    assert store.set("api_key", b"third") == "v3"
    assert store.values_for({"api_key": "v1", "db": "v1"}) == {
        "api_key": b"first-clear-value",
        "db": b"db-clear-pw",
    }


def test_migration_happens_on_set_too_and_only_once(tmp_path: Path) -> None:
    root = tmp_path / "secrets"
    write_old_store(root, {"db": [b"db-clear-pw"]})
    SecretStore(root).set("new", b"v")
    assert (root / "db" / "v1").read_bytes().startswith(MAGIC)
    # A clear file that appears later (an older Kiln, a hand edit) is refused, not adopted.
    (root / "db" / "v2").write_bytes(b"planted")
    with pytest.raises(KilnError, match="secret db v2: cannot decrypt"):
        SecretStore(root).read("db", "v2")
    assert (root / "db" / "v2").read_bytes() == b"planted"


def test_migration_under_a_wrong_environment_key_is_refused_by_the_first_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A half-encrypted store (no .keycheck yet) still proves the key before going on."""
    root = tmp_path / "secrets"
    write_old_store(root, {"a": [b"clear-a"], "b": [b"clear-b"]})
    monkeypatch.setenv("KILN_SECRET_KEY", b64(KEY_A))
    SecretStore(root).read("a", "v1")
    (root / ".keycheck").unlink()
    (root / "b" / "v1").write_bytes(b"clear-b")
    monkeypatch.setenv("KILN_SECRET_KEY", b64(KEY_B))
    with pytest.raises(KilnError, match="KILN_SECRET_KEY is not the key of the secret store"):
        SecretStore(root).read("b", "v1")
    assert (root / "b" / "v1").read_bytes() == b"clear-b"
    monkeypatch.setenv("KILN_SECRET_KEY", b64(KEY_A))
    assert SecretStore(root).read("b", "v1") == b"clear-b"
    assert decrypts_to(KEY_A, (root / "b" / "v1").read_bytes(), "b", "v1") == b"clear-b"


def test_remove_leaves_nothing_that_holds_or_decrypts_to_the_value(store: SecretStore) -> None:
    store.set("k", VALUE)
    store.set("k", VALUE + b"-2")
    store.set("keep", b"other")
    (store.root / "k" / ".tmp-crashed").write_bytes(VALUE)  # a writer that died
    (store.root / "k" / "v2.bak").write_bytes((store.root / "k" / "v2").read_bytes())
    store.remove("k")
    key = store_key(store.root)
    assert sorted(p.name for p in (store.root / "k").iterdir()) == [".lock", "current.json"]
    for path, data in files(store.root).items():
        for needle in encodings(VALUE):
            assert needle not in data, path
        for version in ("v1", "v2", "v3"):
            assert decrypts_to(key, data, "k", version) is None, path
    assert store.read("keep", "v1") == b"other"


def test_remove_works_without_the_key(store: SecretStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting a leaked credential must not wait for the right key."""
    store.set("k", VALUE)
    monkeypatch.setenv("KILN_SECRET_KEY", b64(KEY_B))
    SecretStore(store.root).remove("k")
    assert not list((store.root / "k").glob("v*"))


def test_a_huge_or_odd_value_file_is_refused_without_being_read(store: SecretStore) -> None:
    store.set("k", b"v")
    huge = store.root / "k" / "v2"
    with huge.open("wb") as f:
        f.truncate(10 * 1024**3)  # sparse: 10 GiB that would not fit in memory
    with pytest.raises(KilnError, match=r"secret k v2: .*v2 is not a regular file of at most"):
        store.read("k", "v2")
    huge.unlink()
    huge.symlink_to(store.root / "k" / "v1")
    with pytest.raises(KilnError, match=r"secret k v2: .* refusing to read it"):
        store.read("k", "v2")


def _set_many(root: str, worker: int, count: int, barrier: Any, out: Any) -> None:
    barrier.wait()
    got: list[str] | str = []
    try:
        for i in range(count):
            got.append(SecretStore(Path(root)).set("k", f"value-{worker}-{i}".encode()))
    except BaseException as e:  # reported, so the test fails with it rather than a timeout
        got = f"{type(e).__name__}: {e}"
    out.put((worker, got))


def test_processes_setting_one_name_at_once_lose_no_version(tmp_path: Path) -> None:
    """A fresh store: the key file itself is raced for, then every version."""
    root = tmp_path / "secrets"
    ctx = multiprocessing.get_context("fork")
    workers, count = 4, 6
    barrier = ctx.Barrier(workers)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_set_many, args=(str(root), w, count, barrier, out))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [r for r in results.values() if isinstance(r, str)] == []
    versions = [v for got in results.values() for v in got]
    assert sorted(versions, key=lambda v: int(v[1:])) == [
        f"v{i}" for i in range(1, workers * count + 1)
    ]
    key = store_key(root)
    store = SecretStore(root)
    for worker, got in results.items():
        for i, version in enumerate(got):
            value = f"value-{worker}-{i}".encode()
            assert store.read("k", version) == value
            assert decrypts_to(key, (root / "k" / version).read_bytes(), "k", version) == value
    assert store.current("k") == f"v{workers * count}"
    assert not list(root.rglob(".tmp-*"))
