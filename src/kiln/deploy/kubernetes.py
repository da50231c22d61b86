"""``kiln.toml`` → Kubernetes manifests: per service a Deployment, a Service and a
PodDisruptionBudget, written as YAML for the user's own tools to apply.

Kiln does not talk to a cluster: there is none to test against here, and an untested
runtime is worse than none. Rendering is pure (:func:`render_spec`: a loaded spec and
the baked image digests in, text out, the same bytes for the same input);
:func:`render_project` is the one function with I/O (bake, read secret versions,
write files). Secret values are never read: a pod mounts Secrets by name.

The YAML is written here, without a YAML library: every string is double-quoted
with YAML's escapes, so no value (a newline, ``---``, a quote) can end its scalar.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.deploy.plan import DesiredService, desired_from_spec
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.spec.models import Health, Service, Spec

__all__ = [
    "MANAGED_BY",
    "SECRETS_DIR",
    "dump_yaml",
    "image_reference",
    "render_project",
    "render_service",
    "render_spec",
]

MANAGED_BY = "kiln"
SECRETS_DIR = "/run/secrets"
"""Where Kiln's runtimes put secrets; the pod gets them at the same place."""
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PROJECT = "kiln.dev/project"
LABEL_CONFIG_HASH = "kiln.dev/config-hash"
"""The first 32 hex digits of Kiln's config hash (a label value holds at most 63)."""
ANNOTATION_CONFIG_HASH = "kiln.dev/config-hash"
"""The whole ``sha256:…`` config hash, as ``kiln plan`` computes it."""
NOBODY = 65534
"""The uid and gid an image without a user runs as: the restricted profile refuses root."""

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
"""RFC 1035 label: what a Service name must be (it becomes a DNS name)."""
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REGISTRY = re.compile(
    r"(?:[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?" + rf"(?:/{_REPO_COMPONENT})*"
)
_REPOSITORY = re.compile(rf"{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _seconds(value: float, minimum: int = 1) -> int:
    """Kubernetes counts whole seconds: Kiln's ``250ms`` becomes 1 s, never 0."""
    return max(minimum, math.ceil(value))


def _memory_quantity(size: int) -> str:
    for power, unit in ((4, "Ti"), (3, "Gi"), (2, "Mi"), (1, "Ki")):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def _cpu_quantity(cpu: float) -> str:
    millis = max(1, math.ceil(round(cpu * 1000, 6)))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def _check_label_value(value: str, what: str) -> str:
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise KilnError(
            f"{what} {value!r} cannot be a Kubernetes label value (at most 63 letters, digits, "
            "'-', '_', '.', starting and ending with a letter or digit)"
        )
    return value


def _object_name(name: str, what: str) -> str:
    """A Kiln name (``api_key``) as a Kubernetes object name (``api-key``)."""
    converted = name.replace("_", "-")
    if len(converted) > 253 or not _DNS_SUBDOMAIN.fullmatch(converted):
        raise KilnError(
            f"{what} {name!r} cannot be a Kubernetes object name (lower-case letters, digits, "
            "'-', '.'; '_' becomes '-')"
        )
    return converted


def image_reference(image: str, digest: str, registry: str | None) -> str:
    """``REGISTRY/IMAGE@sha256:…``: pods run the exact image Kiln baked, never a tag."""
    if not _DIGEST.fullmatch(digest):
        raise KilnError(f"image {image!r}: {digest!r} is not a sha256 digest")
    if not _REPOSITORY.fullmatch(image):
        raise KilnError(
            f"image {image!r} cannot be a registry repository name (lower-case letters, "
            "digits, '.', '_', '-', '/')"
        )
    if registry is None:
        return f"{image}@{digest}"
    prefix = registry.rstrip("/")
    if "://" in prefix or not _REGISTRY.fullmatch(prefix):
        raise KilnError(
            f"--registry {registry!r} is not HOST[:PORT][/PREFIX] "
            "such as registry.example:5000/team"
        )
    return f"{prefix}/{image}@{digest}"


def _probe_handler(health: Health, port: int) -> dict[str, Any]:
    kind = health.kind
    if kind == "http":
        return {"httpGet": {"path": health.http, "port": port}}
    if kind == "exec":
        return {"exec": {"command": list(health.exec or [])}}
    return {"tcpSocket": {"port": port}}


def _probes(health: Health, port: int) -> dict[str, dict[str, Any]]:
    """Readiness gates rotation (``healthy_after`` passes in a row, as Kiln's proxy does);
    liveness replaces a pod after ``unhealthy_after`` failures; ``start_period`` becomes a
    startup probe, during which failures do not count (as in Kiln)."""
    period = _seconds(health.interval)
    timing = {"periodSeconds": period, "timeoutSeconds": _seconds(health.timeout)}
    probes = {
        "readinessProbe": {
            **_probe_handler(health, port),
            **timing,
            "successThreshold": health.healthy_after,
            "failureThreshold": health.unhealthy_after,
        },
        "livenessProbe": {
            **_probe_handler(health, port),
            **timing,
            "successThreshold": 1,
            "failureThreshold": health.unhealthy_after,
        },
    }
    if health.start_period > 0:
        probes["startupProbe"] = {
            **_probe_handler(health, port),
            **timing,
            "successThreshold": 1,
            "failureThreshold": math.ceil(health.start_period / period) + health.unhealthy_after,
        }
    return probes


def _run_as(spec: Spec, service: Service) -> tuple[int, int]:
    """The recipe's numeric ``uid[:gid]``: the kubelet can only check that a numeric user is
    not root; an image without a user runs as nobody."""
    recipe = spec.images.get(service.image)
    user = recipe.user if recipe is not None else None
    if not user:
        return NOBODY, NOBODY
    uid_text, _, gid_text = user.partition(":")
    if not uid_text.isdigit() or (gid_text and not gid_text.isdigit()):
        raise KilnError(
            f"images.{service.image}.user: {user!r} is a name; Kubernetes' runAsNonRoot needs "
            'a numeric uid:gid such as "65534:65534"'
        )
    uid = int(uid_text)
    gid = int(gid_text) if gid_text else uid
    if uid == 0:
        raise KilnError(
            f"images.{service.image}.user: root cannot run under the restricted "
            'security context; set a numeric non-root user such as "65534:65534"'
        )
    return uid, gid


def _pdb_max_unavailable(service: Service) -> int:
    """``update.max_unavailable``, but a node drain may always evict one pod (a budget of 0
    blocks drains forever) and never every replica at once."""
    return max(1, min(service.update.max_unavailable, service.replicas - 1))


def render_service(
    spec: Spec, desired: DesiredService, registry: str | None = None
) -> list[dict[str, Any]]:
    """The Deployment, Service and PodDisruptionBudget of one service, as API objects."""
    name = desired.name
    service = spec.services[name]
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise KilnError(
            f"services.{name!r}: a Kubernetes Service name must be a DNS label (at most 63 "
            "lower-case letters, digits and '-', starting with a letter); rename the service"
        )
    project = _check_label_value(spec.project.name, "project.name")
    selector = {LABEL_NAME: name, LABEL_PROJECT: project}
    labels = {**selector, LABEL_MANAGED_BY: MANAGED_BY}
    short_hash = desired.config_hash.removeprefix("sha256:")[:32]
    annotations = {ANNOTATION_CONFIG_HASH: desired.config_hash}
    repository = service.image if not service.image.startswith("sha256:") else name
    image = image_reference(repository, desired.image_digest, registry)
    uid, gid = _run_as(spec, service)

    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if service.secrets:
        objects: dict[str, str] = {}
        sources = []
        for secret in service.secrets:
            object_name = _object_name(secret, f"services.{name}.secrets: secret")
            if objects.setdefault(object_name, secret) != secret:
                raise KilnError(
                    f"services.{name}.secrets: {objects[object_name]!r} and {secret!r} are both "
                    f"the Kubernetes Secret {object_name!r}"
                )
            sources.append(
                {"secret": {"name": object_name, "items": [{"key": secret, "path": secret}]}}
            )
        volumes.append({"name": "secrets", "projected": {"sources": sources, "defaultMode": 0o440}})
        mounts.append({"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True})
    for i, volume in enumerate(service.volumes):
        claim = _object_name(volume.name, f"services.{name}.volumes: volume")
        volumes.append(
            {
                "name": f"volume-{i}",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": volume.readonly},
            }
        )
        mounts.append(
            {"name": f"volume-{i}", "mountPath": volume.path, "readOnly": volume.readonly}
        )
    for i, path in enumerate(service.writable):
        volumes.append({"name": f"writable-{i}", "emptyDir": {}})
        mounts.append({"name": f"writable-{i}", "mountPath": path})

    limits: dict[str, str] = {}
    if service.resources.cpu is not None:
        limits["cpu"] = _cpu_quantity(service.resources.cpu)
    if service.resources.memory is not None:
        limits["memory"] = _memory_quantity(service.resources.memory)
    env = [{"name": "PORT", "value": str(service.port)}]
    env += [{"name": k, "value": v} for k, v in sorted(service.env.items()) if k != "PORT"]
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "app", "containerPort": service.port, "protocol": "TCP"}],
        "env": env,
        **_probes(service.health, service.port),
        "resources": {"limits": limits, "requests": dict(limits)} if limits else {},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": gid,
            "capabilities": {
                "drop": ["ALL"],
                # Kubernetes names capabilities without the CAP_ prefix Kiln writes.
                "add": sorted({cap.removeprefix("CAP_") for cap in service.cap_add}),
            },
        },
        "volumeMounts": mounts,
    }
    if not service.cap_add:
        del container["securityContext"]["capabilities"]["add"]
    for key, value in (("resources", limits), ("volumeMounts", mounts)):
        if not value:
            del container[key]
    seccomp = "RuntimeDefault" if service.seccomp == "default" else "Unconfined"
    min_ready = _seconds(service.update.min_healthy_time, minimum=0)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {
            "replicas": service.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {
                    "maxSurge": service.update.max_surge,
                    "maxUnavailable": service.update.max_unavailable,
                },
            },
            "minReadySeconds": min_ready,
            # The API refuses a deadline that is not longer than minReadySeconds.
            "progressDeadlineSeconds": max(
                _seconds(service.update.progress_deadline), min_ready + 1
            ),
            "template": {
                "metadata": {
                    "labels": {**labels, LABEL_CONFIG_HASH: short_hash},
                    "annotations": annotations,
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": _seconds(service.stop_grace, minimum=0),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": uid,
                        "runAsGroup": gid,
                        "seccompProfile": {"type": seccomp},
                    },
                    "containers": [container],
                    **({"volumes": volumes} if volumes else {}),
                },
            },
        },
    }
    listen = service.listen if service.listen is not None else service.port
    kube_service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": service.protocol,
                    "port": listen,
                    "targetPort": service.port,
                    "protocol": "TCP",
                }
            ],
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "maxUnavailable": _pdb_max_unavailable(service),
            "selector": {"matchLabels": selector},
        },
    }
    return [deployment, kube_service, budget]


def render_spec(
    spec: Spec,
    digests: Mapping[str, str],
    *,
    registry: str | None = None,
    secrets_versions: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """File name → YAML text, one multi-document file per service. ``digests`` maps image
    name → manifest digest (as for :func:`kiln.deploy.plan.desired_from_spec`)."""
    desired = desired_from_spec(spec, digests, secrets_versions)
    header = (
        f"# Rendered by kiln from {spec.path.name} (project {spec.project.name}"
        + (f", environment {spec.environment}" if spec.environment else "")
        + "); regenerate with kiln render kubernetes instead of editing.\n"
    )
    return {
        f"{name}.yaml": header
        + "---\n".join(dump_yaml(doc) for doc in render_service(spec, want, registry))
        for name, want in sorted(desired.items())
    }


def render_project(
    target: Path,
    env: str | None,
    outdir: Path,
    *,
    registry: str | None = None,
    home: Path | None = None,
) -> list[Path]:
    """``kiln render kubernetes``: bake what the services use (the digests go into the
    manifests), then write ``OUTDIR/SERVICE.yaml``; returns the files written."""
    from kiln.deploy.secrets import NAME_RE, SecretStore
    from kiln.image.bake import bake_project
    from kiln.paths import kiln_home
    from kiln.spec import load_spec

    parent = outdir.absolute().parent
    if not parent.is_dir():
        raise KilnError(f"-o {outdir}: the directory {parent} does not exist")
    if outdir.exists() and not outdir.is_dir():
        raise KilnError(f"-o {outdir}: not a directory")
    if registry is not None:
        image_reference("check", "sha256:" + "0" * 64, registry)
    spec = load_spec(target, env)
    store = SecretStore((home or kiln_home()) / "secrets")
    versions = {
        name: store.current(name) or ""
        for service in spec.services.values()
        for name in service.secrets
        if NAME_RE.fullmatch(name)
    }
    needed = sorted({s.image for s in spec.services.values() if not s.image.startswith("sha256:")})
    results = bake_project(spec.path, needed, env=env) if needed else {}
    digests = {name: result.digest for name, result in results.items()}
    files = render_spec(spec, digests, registry=registry, secrets_versions=versions)
    outdir.mkdir(exist_ok=True)
    written = []
    for file_name, text in files.items():
        path = outdir / file_name
        _write_atomically(path, text)
        written.append(path)
    return written


def _write_atomically(path: Path, text: str) -> None:
    """A reader (``kubectl apply -f DIR``) never sees half a file."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS = frozenset({"y", "yes", "n", "no", "true", "false", "on", "off", "null"})
"""Plain words YAML 1.1 (which PyYAML and Go's yaml still read) takes for booleans or null."""


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quoted(text: str) -> str:
    """A double-quoted YAML scalar: printable characters as they are, everything else
    (line breaks included, U+2028 and NEL too) escaped, so the value stays on its line."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif (
            0x20 <= code <= 0x7E
            or (0xA0 <= code <= 0xD7FF and code not in (0x2028, 0x2029))
            or (0xE000 <= code <= 0xFFFD and code != 0xFEFF)
            or code >= 0x10000
        ):
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quoted(value)
    if value == {}:
        return "{}"
    if value == []:
        return "[]"
    raise TypeError(f"cannot write {type(value).__name__} as a manifest value")


def _key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) and key.lower() not in _YAML_WORDS else _quoted(key)


def _block(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{_key(key)}:")
                lines.extend(_block(item, indent + 2))
            else:
                lines.append(f"{pad}{_key(key)}: {_scalar(item)}")
    else:
        for item in value:
            if isinstance(item, dict | list) and item:
                first, *rest = _block(item, 0)
                lines.append(f"{pad}- {first}")
                lines.extend(f"{pad}  {line}" for line in rest)
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return lines


def dump_yaml(document: Mapping[str, Any]) -> str:
    """One YAML document in block style, keys in the order given (deterministic)."""
    return "\n".join(_block(dict(document), 0)) + "\n"
