"""How read commands show things to people; ``--json`` bypasses all of this."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def short(digest: str, n: int = 12) -> str:
    return digest.removeprefix("sha256:")[:n]


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Plain aligned columns: readable in a terminal, stable in a pipe."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    for line in [headers, *rows]:
        sys.stdout.write(
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n"
        )


def print_images(entries: list[Any], as_json: bool) -> None:
    """CREATED is when the image was baked; the config's own ``created`` is the same for
    every bake of a recipe (reproducible), so it would say nothing."""
    if as_json:
        sys.stdout.write(
            json.dumps([_image_json(e) for e in entries], indent=2, sort_keys=True) + "\n"
        )
        return
    rows = []
    for e in entries:
        name, _, tag = e.ref_name.partition(":")
        created = _local_time(e.stored or e.created)
        rows.append([name, tag, short(e.digest), created, human_size(e.size)])
    print_table(["NAME", "TAG", "DIGEST", "CREATED", "SIZE"], rows)


def _local_time(rfc3339: str | None) -> str:
    """``2025-05-01T10:00:00Z`` → ``2025-05-01 12:00:00`` in the local zone."""
    from datetime import datetime

    if not rfc3339:
        return "-"
    try:
        moment = datetime.fromisoformat(rfc3339)
    except ValueError:
        return rfc3339
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _image_json(entry: Any) -> dict[str, Any]:
    return {
        "ref": entry.ref_name,
        "digest": entry.digest,
        "size": entry.size,
        "created": entry.stored or entry.created,
    }


def inspect_image(store: Any, ref: str) -> dict[str, Any]:
    """``created``: when it was baked; ``config.created`` stays the reproducible time."""
    desc = store.resolve(ref)
    manifest = store.manifest(desc.digest)
    tagged = [e for e in store.images() if e.digest == desc.digest]
    return {
        "ref": ref,
        "digest": desc.digest,
        "tags": [e.ref_name for e in tagged],
        "created": min((e.stored for e in tagged if e.stored), default=None),
        "manifest": manifest,
        "config": store.config(desc.digest),
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def print_status(data: dict[str, Any]) -> None:
    services = data.get("services") or {}
    if not services:
        print("no services; run kiln up")
        return
    for name, svc in services.items():
        ready = sum(1 for i in svc.get("instances", []) if i.get("state") == "ready")
        rollout = svc.get("rollout")
        state = svc.get("state", "ok")
        failed = svc.get("failed") or {}
        if state == "failed":
            print(f"{name}: FAILED: r{failed.get('revision')}: {failed.get('reason') or '?'}")
            continue
        if state == "stopped":
            print(f"{name}: stopped (r{svc.get('stopped_revision')}; kiln start {name} runs it)")
            continue
        print(
            f"{name}: r{svc.get('active_revision')} · {ready}/{svc.get('desired_replicas')} ready"
            + (f" · {state.upper()}" if state in ("degraded", "alarm") else "")
            + f" · listen :{svc.get('listen') or '-'}"
            + (f" · {_rollout(rollout)}" if rollout else "")
            + "".join(f" · ALARM: {a}" for a in svc.get("alarms", []))
        )
        rows = [
            [
                str(i.get("id")),
                f"r{i.get('revision')}",
                str(i.get("state")) + (", touched" if i.get("touched") else ""),
                _health(i),
                _age(i.get("age")),
                str(i.get("address") or i.get("port") or "-"),
                str(i.get("pid") or "-"),
                short(str(i.get("image_digest") or i.get("digest") or "")),
            ]
            for i in svc.get("instances", [])
        ]
        print_table(["INSTANCE", "REV", "STATE", "HEALTH", "AGE", "ADDRESS", "PID", "IMAGE"], rows)
        if any(i.get("touched") for i in svc.get("instances", [])):
            print(
                f"touched: a command ran in it (kiln exec); kiln restart {name} replaces it first"
            )


def _health(instance: dict[str, Any]) -> str:
    """The health verdict, and what the last probe saw while it is not passing."""
    health = str(instance.get("health", "-"))
    probe = instance.get("probe")
    if health in ("ready", "-") or not probe:
        return health
    return f"{health} ({probe})"


def _rollout(info: dict[str, Any]) -> str:
    """``rollout: deploy to r3, 1/3 healthy, step 2 (d-1a2b3c4d, 12 s)``, not a dict."""
    text = f"rollout: {info.get('kind', 'deploy')} to r{info.get('target', '?')}"
    if info.get("desired") is not None:
        text += f", {info.get('healthy', 0)}/{info.get('desired')} healthy"
    if info.get("canary"):
        from kiln.cli.canary_cmd import canary_line

        text += " · " + canary_line(info)
    elif info.get("phase"):
        text += f", {info['phase']}"
    elif info.get("step"):
        text += f", step {info['step']}"
    started = info.get("started")
    age = f", {time.time() - float(started):.0f} s" if started else ""
    return text + f" ({info.get('deployment') or '-'}{age})"


def print_history(data: dict[str, Any]) -> None:
    rows = [
        [
            f"r{r.get('number')}",
            str(r.get("status")),
            short(str(r.get("image_digest", ""))),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r.get("created", 0)))),
            str(r.get("git_commit") or "-")[:10],
            "; ".join(r.get("changes") or []),
            str(r.get("reason") or ""),
        ]
        for r in data.get("revisions", [])
    ]
    print_table(["REV", "STATUS", "IMAGE", "CREATED", "COMMIT", "CHANGES", "REASON"], rows)
