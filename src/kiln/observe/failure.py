"""Why a deployment failed, in words a user can act on.

``error: deployment failed: see kiln events`` made people dig; the deployment
record already names each failed service's reason and the instances that
caused it, and the state and log store know how each of those ended. This
puts them together: the reason, each culprit's exit or last probe result and
its last log lines, and the commands that show more.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["explain_failure"]

LOG_LINES = 5


def explain_failure(home: Path, record: dict[str, Any]) -> str:
    """One paragraph per service that did not succeed; "" when all did."""
    from kiln.deploy.state import StateStore
    from kiln.errors import KilnError
    from kiln.observe.logs import LogStore

    logs = LogStore(home / "logs")
    parts: list[str] = []
    try:
        state: StateStore | None = StateStore(home / "state.db")
    except KilnError:
        state = None
    try:
        for service, entry in sorted((record.get("services") or {}).items()):
            outcome = entry.get("outcome")
            if outcome in ("succeeded", "running"):
                continue
            rev = entry.get("revision")
            head = f"{service}" + (f" r{rev}" if rev else "") + f": {outcome}"
            if entry.get("reason"):
                head += f": {entry['reason']}"
            lines = [head]
            probes = entry.get("probes") or {}
            for iid in entry.get("culprits") or []:
                lines.extend(_culprit(state, logs, service, str(iid), probes.get(iid)))
            culprits = entry.get("culprits") or []
            more = f"kiln logs {service}" + (f" --instance {culprits[0]}" if culprits else "")
            lines.append(f"  more: {more} · kiln events")
            parts.append("\n".join(lines))
    finally:
        if state is not None:
            state.close()
    return "\n".join(parts)


def _culprit(state: Any, logs: Any, service: str, iid: str, probe: str | None) -> list[str]:
    from kiln.errors import KilnError
    from kiln.observe.hints import instance_hints

    out: list[str] = []
    how = ""
    port = exit_code = None
    if state is not None:
        try:
            rec = state.instance(iid)
            how = rec.reason or rec.state
            port, exit_code = rec.port, rec.exit_code
            if rec.exit_code is not None and "exit" not in how:
                how += f" (exit code {rec.exit_code})"
        except KilnError:
            how = ""
    out.append(f"  {iid}: {how or 'no record'}")
    if probe:
        out.append(f"  last probe: {probe}")
    try:
        last = deque(logs.read(service, iid), maxlen=LOG_LINES)
    except (OSError, KilnError):
        last = deque()
    if last:
        out.append(f"  last {len(last)} log line(s) of {iid}:")
        out.extend(f"    {line.stream}: {line.line}" for line in last)
    else:
        out.append(f"  {iid} wrote no log lines")
    seen = " ".join(filter(None, [how, probe or ""]))
    for hint in instance_hints(port, exit_code, seen, [line.line for line in last]):
        out.append(f"  hint: {hint}")
    return out
