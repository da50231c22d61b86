"""``kiln down`` when no agent runs: what a killed agent left running still goes.

Instances keep running when the agent dies (their shims outlive it) and so
does the proxy; a user who runs ``kiln down`` then still expects nothing of
this home to be left: no instance, no proxy, no bridge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["down_without_agent"]


def down_without_agent(home: Path) -> dict[str, Any]:
    from kiln.runtime import Releaser
    from kiln.runtime.select import RuntimeChoice, read_choice
    from kiln.traffic.haproxy import HAProxyRouter

    runtime = (read_choice(home) or RuntimeChoice()).open(home)
    stopped = []
    try:
        for handle in runtime.list():
            runtime.destroy(handle)
            stopped.append(handle.instance_id)
        router = HAProxyRouter(home)
        had_proxy = router.recorded_alive()
        router.stop()
        if isinstance(runtime, Releaser):
            runtime.shutdown()
    finally:
        runtime.close()
    if (home / "state.db").exists():
        from kiln.agent.engine import settle_down
        from kiln.deploy.state import StateStore

        with StateStore(home / "state.db") as state:
            settle_down(state)
    return {"stopped": sorted(stopped), "proxy": "stopped" if had_proxy else "none"}
