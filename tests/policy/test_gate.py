"""The policy gate over real evidence: a scratch image baked into a tmp store, signed
(or not) with a real key, evaluated by regopy in its bounded child process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from policy_project import project_toml

from kiln.image.bake import bake
from kiln.image.store import ImageStore
from kiln.policy.gate import (
    GatedService,
    Module,
    PolicyError,
    default_modules,
    evaluate,
    gate_services,
)
from kiln.spec import load_spec
from kiln.spec.models import PolicySettings
from kiln.supply.signing import generate_key, sign_image

PROJECT = project_toml("policytest")


@pytest.fixture
def baked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, ImageStore, str]:
    home = tmp_path / "home"
    monkeypatch.setenv("KILN_HOME", str(home))
    project = tmp_path / "project"
    (project / "app").mkdir(parents=True)
    (project / "app" / "run").write_text("#!/bin/sh\n")
    (project / "kiln.toml").write_text(PROJECT)
    digest = bake(load_spec(project / "kiln.toml"))["app"].digest
    return project, ImageStore(home / "images"), digest


def _web(digest: str, **config: object) -> dict[str, GatedService]:
    spec = {"image": "app", "health": {"http": "/healthz", "exec": None, "tcp": False}, **config}
    return {"web": GatedService("app", digest, spec)}


def test_default_bundle_denies_an_unsigned_image_and_passes_a_signed_one(
    baked: tuple[Path, ImageStore, str], tmp_path: Path
) -> None:
    project, store, digest = baked
    generate_key(project / "team")
    settings = PolicySettings(enforce=True, keys=["team.pub"], sources=["scratch"])
    unsigned = gate_services(store, _web(digest), settings, project, tmp_path / "no.db")
    assert [v.message for v in unsigned.denied] == [
        "image base unknown (no signed provenance) is not an allowed source ([policy] sources)",
        f"image {digest} is not signed by a trusted key",
    ]
    assert unsigned.denied[0].origin == "kiln:default/kiln.rego"
    with pytest.raises(PolicyError, match=r"deny: web: image sha256:\w+ is not signed"):
        unsigned.check()

    sign_image(store, digest, project / "team.key")
    signed = gate_services(store, _web(digest), settings, project, tmp_path / "no.db")
    assert signed.denied == []
    assert [v.message for v in signed.warnings] == [
        "no vulnerability database: run kiln scan db import PATH"
    ]
    signed.check()


def test_a_key_that_did_not_sign_is_not_trusted(
    baked: tuple[Path, ImageStore, str], tmp_path: Path
) -> None:
    project, store, digest = baked
    generate_key(project / "team")
    generate_key(project / "other")
    sign_image(store, digest, project / "other.key")
    settings = PolicySettings(enforce=True, keys=["team.pub"])
    result = gate_services(store, _web(digest), settings, project, tmp_path / "no.db")
    assert any("not signed by a trusted key" in v.message for v in result.denied)


def test_without_enforce_the_default_bundle_only_warns(
    baked: tuple[Path, ImageStore, str], tmp_path: Path
) -> None:
    project, store, digest = baked
    settings = PolicySettings(sources=["debian:*"], max_image_age="1s")
    time.sleep(1.5)
    result = gate_services(
        store,
        _web(digest, health={"http": None, "exec": None, "tcp": False}),
        settings,
        project,
        tmp_path / "no.db",
    )
    assert result.denied == []
    messages = {v.message for v in result.warnings}
    assert "no trusted key: list public keys in [policy] keys to check signatures" in messages
    assert any("is not an allowed source" in m for m in messages)
    assert any("more than max_image_age 1s" in m for m in messages)
    assert any(m.startswith("no health check") for m in messages)
    result.check()  # warnings never fail


def test_an_image_not_in_the_store_is_not_pinned(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    missing = "sha256:" + "0" * 64
    result = gate_services(store, _web(missing), PolicySettings(enforce=True), tmp_path)
    assert "image app is not pinned by a digest in the image store" in {
        v.message for v in result.denied
    }


def test_the_root_user_is_denied() -> None:
    evidence = {
        "image": {"user": "0:0", "pinned": True},
        "settings": {"keys": ["k"], "sources": []},
        "signature": {"signed": True},
        "spec": {"health": {"http": "/"}},
    }
    result = evaluate(default_modules(), {"web": evidence}, enforce=True)
    assert [v.message for v in result.denied] == [
        "runs as root (image user 0:0): set user in the image recipe"
    ]


def _user(text: str, name: str = "policy/mine.rego") -> list[Module]:
    return [Module(name, text, "mine", False)]


def test_user_denies_deny_even_without_enforce_and_keep_quotes() -> None:
    rules = (
        'package mine\n\ndeny contains msg if {\n  msg := sprintf("bad %s", [input.service])\n}\n'
    )
    result = evaluate(_user(rules), {'we"b\\': {"service": 'we"b\\'}}, enforce=False)
    assert [v.line() for v in result.denied] == ['deny: we"b\\: bad we"b\\ (policy/mine.rego)']


def test_a_syntax_error_names_file_and_line() -> None:
    rules = "package mine\n\ndeny contains msg if {\n  msg := \n}\n"
    with pytest.raises(PolicyError, match=r"policy policy/mine\.rego:4: Invalid assignment"):
        evaluate(_user(rules), {"web": {}}, enforce=False)


def test_recursion_is_reported_not_followed() -> None:
    rules = "package mine\n\na contains x if { some x in b }\nb contains x if { some x in a }\n"
    rules += "deny contains msg if { msg := a[_] }\n"
    with pytest.raises(PolicyError, match=r"[Rr]ecursion"):
        evaluate(_user(rules), {"web": {}}, enforce=False)


def test_a_runaway_policy_is_stopped_at_the_timeout() -> None:
    rules = "package mine\n\ndeny contains msg if {\n  some i in numbers.range(1, 100000000)\n"
    rules += '  msg := sprintf("m%d", [i])\n}\n'
    started = time.monotonic()
    with pytest.raises(PolicyError, match=r"more than 2 s and was stopped .*policy/mine\.rego"):
        evaluate(_user(rules), {"web": {}}, enforce=False, timeout=2.0)
    assert time.monotonic() - started < 5


def test_huge_output_is_cut_to_a_bounded_list() -> None:
    rules = "package mine\n\nwarn contains msg if {\n  some i in numbers.range(1, 2000)\n"
    rules += '  msg := sprintf("w%d %s", [i, "x"])\n}\n'
    result = evaluate(_user(rules), {"web": {}}, enforce=False)
    assert len(result.warnings) == 101
    assert result.warnings[-1].message == "… more messages cut"


def test_a_policy_file_glob_that_matches_nothing_or_leaves_the_project_fails(
    tmp_path: Path,
) -> None:
    store = ImageStore(tmp_path / "images")
    missing = "sha256:" + "0" * 64
    for pattern, why in (("policy/*.rego", "matches no file"), ("../x.rego", "inside")):
        with pytest.raises(PolicyError, match=why):
            gate_services(store, _web(missing), PolicySettings(files=[pattern]), tmp_path)
