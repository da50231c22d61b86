from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from kiln.deploy.secrets import MAX_SECRET_BYTES, SecretStore
from kiln.errors import KilnError


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
    for path in (store.root / "db.password").iterdir():
        assert mode(path) == 0o600, path
    assert (store.root / "db.password" / "v1").read_bytes() == b"hunter2"
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
    assert str(e.value) == (
        "services.web.secrets: secret api_key is not set; set it with: kiln secret set api_key"
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
    (store.root / "k" / "v2").write_bytes(b"orphan")
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
