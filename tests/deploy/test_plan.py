from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kiln.deploy.plan import (
    Action,
    DesiredService,
    Plan,
    config_hash,
    desired_from_spec,
    make_plan,
)
from kiln.deploy.state import InstanceRecord, Revision, StateSnapshot, StateStore
from kiln.errors import KilnError
from kiln.spec.models import Project, Service, Spec

D1 = "sha256:" + "ab12" * 16
D2 = "sha256:" + "cd34" * 16


def spec(**services: dict[str, Any]) -> Spec:
    return Spec(
        project=Project(name="shop"),
        services={name: Service.model_validate(cfg) for name, cfg in services.items()},
    )


def web(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "image": "web",
        "replicas": 3,
        "env": {"GREETING": "hello"},
        "secrets": ["api_key"],
        "health": {"http": "/healthz"},
    }
    cfg.update(over)
    return cfg


def desired(
    digest: str = D1, secrets: dict[str, str] | None = None, **over: Any
) -> dict[str, DesiredService]:
    return desired_from_spec(spec(web=web(**over)), {"web": digest}, secrets or {"api_key": "1"})


def deployed(
    want: dict[str, DesiredService], states: tuple[str, ...] = ("ready",) * 3, number: int = 1
) -> StateSnapshot:
    """A snapshot where each desired service runs ``states`` instances of revision ``number``."""
    revisions: dict[tuple[str, int], Revision] = {}
    instances: list[InstanceRecord] = []
    for name, d in want.items():
        revisions[(name, number)] = Revision(
            service=name,
            number=number,
            created=0.0,
            image_digest=d.image_digest,
            config=d.revision_config(),
            config_hash=d.config_hash,
            spec_text="",
            spec_path="",
            git_commit=None,
            environment=None,
            status="active",
        )
        for i, state in enumerate(states):
            instances.append(
                InstanceRecord(
                    id=f"{name}-{i}",
                    service=name,
                    revision=number,
                    state=state,  # type: ignore[arg-type]
                    port=40000 + i,
                    handle=None,
                    created=float(i),
                )
            )
    return StateSnapshot(
        instances=tuple(instances), revisions=revisions, active=dict.fromkeys(want, number)
    )


def test_config_hash_ignores_replicas_and_secret_values() -> None:
    base = desired()["web"]
    assert desired(replicas=7)["web"].config_hash == base.config_hash
    assert desired(listen=9000)["web"].config_hash == base.config_hash
    assert desired(digest=D2)["web"].config_hash != base.config_hash
    assert desired(env={"GREETING": "hi"})["web"].config_hash != base.config_hash
    assert desired(secrets={"api_key": "2"})["web"].config_hash != base.config_hash
    assert base.secrets_versions == {"api_key": "1"}
    assert config_hash({}, D1, {}) == config_hash({"replicas": 3}, D1, {})


def test_missing_digest_names_the_key() -> None:
    with pytest.raises(
        KilnError, match=r"kiln.toml: services.web.image: no digest for image 'web'"
    ):
        desired_from_spec(spec(web=web()), {})


def test_first_deploy_creates_every_replica() -> None:
    plan = make_plan(desired(), StateSnapshot())
    assert [c.action for c in plan.changes] == [Action.CREATE] * 3
    assert all(c.reasons == ("new service",) for c in plan.changes)
    assert plan.service("web").new_revision  # type: ignore[union-attr]
    assert not plan.empty
    assert plan.summary == "Plan: 3 to create, 0 to replace, 0 to destroy."


def test_no_changes() -> None:
    want = desired()
    plan = make_plan(want, deployed(want))
    assert plan.empty
    assert plan.render() == "No changes. Actual matches kiln.toml.\n"


@pytest.mark.parametrize(
    ("over", "reasons"),
    [
        ({"digest": D2}, ["image sha256:ab12ab12ab12… → sha256:cd34cd34cd34…"]),
        ({"env": {"GREETING": "hi"}}, ["env GREETING changed"]),
        ({"env": {"GREETING": "hello", "NEW": "x"}}, ["env NEW added"]),
        ({"env": {}}, ["env GREETING removed"]),
        ({"port": 9090}, ["port 8080 → 9090"]),
        ({"health": {"http": "/ready"}}, ["health.http changed"]),
        ({"resources": {"memory": "64MiB"}}, ["resources.memory changed"]),
        ({"secrets": {"api_key": "2"}}, ["secret api_key 1 → 2"]),
        ({"digest": D2, "env": {"GREETING": "x"}}, ["image", "env GREETING changed"]),
    ],
)
def test_replace_reasons(over: dict[str, Any], reasons: list[str]) -> None:
    actual = deployed(desired())
    plan = make_plan(desired(**over), actual)
    changes = list(plan.changes)
    assert [c.action for c in changes] == [Action.REPLACE] * 3
    assert [c.instance for c in changes] == ["web-0", "web-1", "web-2"]
    for got, want in zip(changes[0].reasons, reasons, strict=True):
        assert got.startswith(want)
    assert "hi" not in plan.render() and "hello" not in plan.render()
    assert plan.summary == "Plan: 0 to create, 3 to replace, 0 to destroy."


def test_scale_up_and_down() -> None:
    actual = deployed(desired())
    up = make_plan(desired(replicas=5), actual)
    assert [(c.action, c.reasons) for c in up.changes] == [(Action.CREATE, ("replicas 3 → 5",))] * 2
    assert up.service("web").new_revision  # type: ignore[union-attr]
    down = make_plan(desired(replicas=1), deployed(desired(), ("ready", "starting", "ready")))
    assert [c.action for c in down.changes] == [Action.DESTROY] * 2
    assert {c.instance for c in down.changes} == {"web-1", "web-2"}, "unready and newest go first"


def test_scale_down_while_replacing_destroys_outdated_first() -> None:
    plan = make_plan(desired(digest=D2, replicas=2), deployed(desired()))
    assert plan.count(Action.DESTROY) == 1
    assert plan.count(Action.REPLACE) == 2
    assert plan.count(Action.CREATE) == 0


def test_dead_instances_are_replaced() -> None:
    want = desired()
    plan = make_plan(want, deployed(want, ("ready", "failed", "lost")))
    assert [(c.action, c.instance, c.reasons) for c in plan.changes] == [
        (Action.REPLACE, "web-1", ("instance dead",)),
        (Action.REPLACE, "web-2", ("instance dead",)),
    ]


def test_draining_instances_do_not_count() -> None:
    want = desired()
    plan = make_plan(want, deployed(want, ("ready", "ready", "ready", "draining")))
    assert plan.empty


def test_service_removed() -> None:
    actual = deployed(desired())
    plan = make_plan({}, actual)
    assert [(c.action, c.reasons) for c in plan.changes] == [
        (Action.DESTROY, ("service removed from kiln.toml",))
    ] * 3
    assert plan.service("web").removed  # type: ignore[union-attr]
    text = plan.render()
    assert "# web: 3 to destroy, service removed from kiln.toml" in text
    assert text.strip().endswith("Plan: 0 to create, 0 to replace, 3 to destroy.")


def test_proxy_settings_need_a_revision_but_no_replacement() -> None:
    plan = make_plan(desired(listen=9000), deployed(desired()))
    assert list(plan.changes) == []
    assert not plan.empty
    assert plan.service("web").settings == ("listen None → 9000",)  # type: ignore[union-attr]
    assert "~ listen None → 9000" in plan.render()


def test_render_terraform_like() -> None:
    plan = make_plan(desired(digest=D2, replicas=4), deployed(desired()))
    text = plan.render()
    lines = text.splitlines()
    assert lines[0] == "# web: 3 to replace, 1 to create"
    assert lines[1].startswith("-/+ web-0 r1: image sha256:ab12ab12ab12… → sha256:cd34cd34cd34…")
    assert lines[4] == "+   (new instance): replicas 3 → 4"
    assert lines[-1] == "Plan: 1 to create, 3 to replace, 0 to destroy."
    colored = plan.render(color=True)
    assert "\x1b[33m-/+" in colored and "\x1b[32m+" in colored
    assert "\x1b" not in text


def test_json_round_trip_and_base() -> None:
    actual = deployed(desired())
    plan = make_plan(desired(digest=D2, replicas=4), actual)
    assert plan.base == actual.state_hash
    text = json.dumps(plan.to_json())
    again = Plan.from_json(text)
    assert again == plan
    assert again.render() == plan.render()
    assert "api_key" in text and '"1"' in text
    with pytest.raises(KilnError, match="not a kiln plan"):
        Plan.from_json({"format": 1})
    with pytest.raises(KilnError, match="plan format 9"):
        Plan.from_json({"format": 9})


def test_plan_against_a_real_store(tmp_path: Path) -> None:
    want = desired()
    with StateStore(tmp_path / "state.db") as store:
        d = want["web"]
        rev = store.next_revision(
            "web",
            image_digest=d.image_digest,
            config=d.revision_config({"cmd": ["app"]}),
            config_hash=d.config_hash,
            status="active",
        )
        for _ in range(3):
            store.add_instance("web", rev.number, port=1, state="ready")
        snap = store.snapshot()
        assert make_plan(want, snap).empty
        plan = make_plan(desired(env={"GREETING": "bye"}), snap)
        assert plan.count(Action.REPLACE) == 3
        assert plan.base == store.state_hash()


def _owned_by(actual: StateSnapshot, project: str) -> StateSnapshot:
    """The same state, its revisions recorded as made by ``project``'s kiln.toml."""
    from dataclasses import replace

    revisions = {
        key: replace(rev, config={**rev.config, "project": project})
        for key, rev in actual.revisions.items()
    }
    return replace(actual, revisions=revisions)


def test_a_plan_touches_only_its_own_projects_services() -> None:
    """Two projects in one KILN_HOME: the second's plan must not remove the first's
    services as 'removed from kiln.toml', nor take over one of the same name (issue 8,
    defect 8)."""
    shop = _owned_by(deployed(desired()), "shop")
    other = make_plan({}, shop, project="blog")
    assert other.empty and not list(other.changes)
    mine = make_plan({}, shop, project="shop")
    assert [c.action for c in mine.changes] == [Action.DESTROY] * 3
    with pytest.raises(KilnError, match=r"service web belongs to project 'shop'.*not to 'blog'"):
        make_plan(desired(), shop, project="blog")
    # A state recorded before projects were: as before, the plan covers it.
    assert [c.action for c in make_plan({}, deployed(desired()), project="blog").changes] == [
        Action.DESTROY
    ] * 3
