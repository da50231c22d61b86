from __future__ import annotations

import subprocess
import sys

import kiln.deploy


def test_public_names_resolve() -> None:
    for name in kiln.deploy.__all__:
        assert getattr(kiln.deploy, name) is not None, name
    assert sorted(kiln.deploy.__all__, key=str.casefold) == sorted(
        set(kiln.deploy.__all__), key=str.casefold
    )


def test_pure_modules_import_no_runtime_or_agent() -> None:
    """The planner, rollout and reconciler read views only: no runtime, proxy or agent."""
    code = (
        "import sys, kiln.deploy.plan, kiln.deploy.rollout, kiln.deploy.reconcile\n"
        "bad = [m for m in sys.modules if m.startswith(('kiln.runtime', 'kiln.agent', "
        "'kiln.traffic', 'kiln.cli'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
