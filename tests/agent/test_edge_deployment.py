"""The token the agent gives its Swarm edges: of the ``edge`` role, kept across agent
restarts (an edge service rolled at every restart would be pointless churn), and an
older agent's viewer token revoked and replaced, so the edges roll onto one that may
post counters."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kiln.agent.edge import EDGE_TOKEN_FILE, EdgeDeployment
from kiln.agent.tokens import EDGE_ROLE, TokenStore


def _deployment(home: Path) -> EdgeDeployment:
    engine: Any = SimpleNamespace(home=home)  # token() reads the home and nothing else
    return EdgeDeployment(engine, runtime=None, listen=None)  # type: ignore[arg-type]


def test_the_edge_token_is_of_the_edge_role_and_kept(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    first = _deployment(tmp_path).token().decode()
    record = TokenStore(tmp_path).check(first)
    assert record is not None and record.role == EDGE_ROLE and record.expires_at is None
    assert (tmp_path / EDGE_TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    # The next agent keeps it: the edge service's fingerprint does not change.
    assert _deployment(tmp_path).token().decode() == first


def test_a_viewer_token_from_an_older_agent_is_revoked_and_replaced(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    store = TokenStore(tmp_path)
    old_record, old = store.create("viewer", "swarm edge", None)
    (tmp_path / EDGE_TOKEN_FILE).write_text(old)
    new = _deployment(tmp_path).token().decode()
    assert new != old and (tmp_path / EDGE_TOKEN_FILE).read_text() == new
    assert store.check(old) is None
    revoked = store.lookup(old)
    assert revoked is not None and revoked.id == old_record.id and revoked.revoked is not None
    record = store.check(new)
    assert record is not None and record.role == EDGE_ROLE
