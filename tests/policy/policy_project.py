"""The project the policy tests gate: one image run as a non-root user, one service
with a health check (what the default bundle asks of both)."""

from __future__ import annotations

__all__ = ["project_toml"]

_IMAGE_AND_SERVICE = """
[images.app]
from = "scratch"
user = "1000"
steps = [{ copy = "app/", to = "/srv/app" }]
cmd = ["/srv/app/run"]

[services.web]
image = "app"
health = { http = "/healthz" }
"""


def project_toml(name: str, extra: str = "") -> str:
    """``kiln.toml`` of project ``name``, with ``extra`` sections after it."""
    return f'[project]\nname = "{name}"\n' + _IMAGE_AND_SERVICE + extra
