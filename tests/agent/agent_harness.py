"""Helpers for end-to-end tests against a real agent (imported by conftest.py and tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import busybox_tree
from kiln.agent.client import AgentClient
from kiln.deploy.plan import desired_from_spec
from kiln.image.digest import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST, canonical_json
from kiln.image.layer import layer_from_dir
from kiln.image.store import ImageStore
from kiln.process import pid_alive
from kiln.spec.models import Spec

HTTPD = ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]


def build_busybox_rootfs(dest: Path, files: dict[str, str] | None = None) -> Path:
    """Static busybox with every applet linked into /bin, and ``files`` under /www."""
    return busybox_tree.build_busybox_rootfs(dest, www=files)


def put_image(
    home: Path,
    name: str,
    tree: Path,
    cmd: list[str],
    env: dict[str, str] | None = None,
    workdir: str = "/www",
) -> str:
    """Store ``tree`` as a one-layer OCI image tagged ``name``; returns the manifest digest."""
    store = ImageStore(home / "images")
    layer = layer_from_dir(tree, store, 0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Cmd": cmd,
            "Env": [f"{k}={v}" for k, v in {"PATH": "/bin", **(env or {})}.items()],
            "WorkingDir": workdir,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.descriptor.to_json()],
    }
    manifest_desc = store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST)
    store.tag(name, manifest_desc)
    return manifest_desc.digest


ImageFactory = Callable[..., str]


_free_port = busybox_tree.free_port


def kill_everything(home: Path) -> None:
    """Leave no process behind: the agent, every instance shim/sandbox, HAProxy."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((home / "agent.pid").read_text().strip())
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    from kiln.traffic.haproxy import HAProxyRouter

    with contextlib.suppress(Exception):
        HAProxyRouter(home).stop()
    instances = home / "instances"
    if instances.is_dir():
        from kiln.runtime.local import LocalRuntime

        runtime = LocalRuntime(home)
        for handle in runtime.list():
            with contextlib.suppress(Exception):
                runtime.stop(handle, 0.5)
                runtime.destroy(handle)


@dataclass
class RunningAgent:
    home: Path
    client: AgentClient

    def pid(self) -> int:
        return int((self.home / "agent.pid").read_text().strip())


def service_spec(image_digest: str, **service: Any) -> Spec:
    """A ``Spec`` with one service ``web`` on ``image_digest``, fast health and rollout knobs."""
    body: dict[str, Any] = {
        "image": image_digest,
        "replicas": 3,
        "port": 8080,
        "health": {"http": "/healthz", "interval": "0.2s", "timeout": "0.5s"},
        "drain_timeout": "1s",
        "stop_grace": "1s",
        "update": {
            "max_surge": 1,
            "max_unavailable": 0,
            "min_healthy_time": "0.2s",
            "healthy_deadline": "3s",
            "progress_deadline": "10s",
        },
    }
    body.update(service)
    return Spec.model_validate({"project": {"name": "t"}, "services": {"web": body}})


def plan_request(spec: Spec) -> dict[str, Any]:
    desired = desired_from_spec(spec, {})
    return {
        "spec_path": "kiln.toml",
        "environment": None,
        "spec_text": "",
        "git_commit": None,
        "digests": {},
        "services": {name: d.to_json() for name, d in desired.items()},
    }


def deploy(client: AgentClient, spec: Spec, timeout: float = 60.0) -> dict[str, Any]:
    """plan + apply + wait: the final deployment record."""
    planned = client.plan(**plan_request(spec))
    started = client.apply(planned["plan"])
    return client.wait_deployment(started["deployment"], timeout=timeout)


def get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, str]:
    import httpx

    resp = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout)
    return resp.status_code, resp.text


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
