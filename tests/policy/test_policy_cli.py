"""``kiln plan`` through the gate and ``kiln policy test``, as a user runs them: the real
CLI in a subprocess, a scratch image baked into a tmp KILN_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from policy_project import project_toml

CLI = (
    "import sys, kiln.cli.policy_cmd; from kiln.cli.main import main; sys.exit(main(sys.argv[1:]))"
)

PROJECT = project_toml(
    "gated",
    """
[policy]
files = ["policy/*.rego"]
""",
)

DENY = """package team

deny contains msg if {
\tinput.spec.replicas < 2
\tmsg := sprintf("%s needs at least 2 replicas", [input.service])
}

warn contains msg if {
\tnot input.sbom.present
\tmsg := "no SBOM attached"
}
"""


def kiln(home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], cwd=cwd, env=env, text=True, capture_output=True
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "app").mkdir(parents=True)
    (root / "app" / "run").write_text("#!/bin/sh\n")
    (root / "policy").mkdir()
    (root / "kiln.toml").write_text(PROJECT)
    return root


def test_a_deny_fails_the_plan_and_changes_nothing(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (project / "policy" / "team.rego").write_text(DENY)
    done = kiln(home, project, "plan")
    assert done.returncode != 0
    assert "deny: web: web needs at least 2 replicas (policy/team.rego)" in done.stderr
    assert "nothing was changed" in done.stderr
    assert not (home / "state.db").exists()
    assert not (home / "agent.pid").exists()
    # the default bundle is not enforced: its findings are warnings, not denies
    assert "warn: web: no trusted key" in done.stderr


def test_warnings_are_shown_and_the_plan_goes_on(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (project / "policy" / "team.rego").write_text(DENY.replace("< 2", "< 1"))
    done = kiln(home, project, "plan")
    assert done.returncode == 2, done.stderr  # changes pending, as without a gate
    assert "web" in done.stdout
    assert "warn: web: no SBOM attached (policy/team.rego)" not in done.stderr  # bake made one
    assert "warn: web: no trusted key" in done.stderr


def test_a_policy_with_a_syntax_error_fails_the_plan_naming_file_and_line(
    project: Path, tmp_path: Path
) -> None:
    (project / "policy" / "bad.rego").write_text(
        "package team\n\ndeny contains x if {\n  x :=\n}\n"
    )
    done = kiln(tmp_path / "home", project, "plan")
    assert done.returncode != 0
    assert "policy/bad.rego:4:" in done.stderr
    assert "Traceback" not in done.stderr


def test_policy_test_reports_each_test_and_fails_on_one(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "rules.rego").write_text(
        "package team\n\nlimit := 3\n\ntest_limit_is_three if { limit == 3 }\n\n"
        "test_limit_is_four if { limit == 4 }\n"
    )
    done = kiln(tmp_path / "home", tmp_path, "policy", "test", str(policies))
    assert done.returncode == 1
    assert "PASS team.test_limit_is_three (rules.rego)" in done.stdout
    assert "FAIL team.test_limit_is_four (rules.rego)" in done.stdout
    assert "1 passed, 1 failed" in done.stdout

    (policies / "rules.rego").write_text("package team\n\ntest_ok if { true }\n")
    assert kiln(tmp_path / "home", tmp_path, "policy", "test", str(policies)).returncode == 0


def test_policy_test_names_the_file_and_line_of_a_syntax_error(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "ok.rego").write_text("package a\n\ntest_ok if { true }\n")
    (policies / "broken.rego").write_text("package b\n\n\ntest_x if {\n  y := \n}\n")
    done = kiln(tmp_path / "home", tmp_path, "policy", "test", str(policies))
    assert done.returncode == 1
    assert "broken.rego:5:" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
