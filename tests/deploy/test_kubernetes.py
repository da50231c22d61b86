"""``kiln render kubernetes``: every manifest passes kubernetes-validate (strict, newest
Kubernetes it ships), Kiln's settings map field by field, the output is byte-identical
for the same input, no secret value reaches it, and no string escapes its scalar."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes_validate import utils as kv_utils

from kiln.deploy.kubernetes import dump_yaml, render_project, render_spec
from kiln.deploy.secrets import SecretStore
from kiln.errors import KilnError
from kiln.spec import load_spec
from kiln.spec.models import Spec

KILN = str(Path(__file__).parents[2] / ".venv" / "bin" / "kiln")
TEMPLATE = Path(__file__).parents[2] / "src" / "kiln" / "spec" / "templates" / "python"
BUSYBOX = Path("/bin/busybox")
K8S_VERSION = kv_utils.latest_version()
DIGEST = "sha256:" + "ab" * 32
DIGESTS = {"web": DIGEST, "cache": "sha256:" + "cd" * 32, "app": "sha256:" + "ef" * 32}

RECIPES = """
[project]
name = "shop"

[images.web]
from = "scratch"
user = "1000:2000"

[images.cache]
from = "scratch"

[images.app]
from = "scratch"
user = "65534"
"""

SPECS = {
    "redis-tcp": """
[services.cache]
image = "cache"
port = 6379
protocol = "tcp"
health = { tcp = true, interval = "2s", timeout = "500ms", unhealthy_after = 5 }
volumes = [{ name = "cache_data", path = "/data" }]
""",
    "exec-health": """
[services.worker]
image = "app"
replicas = 3
health = { exec = ["/bin/check", "--quick"], start_period = "10s", interval = "2s" }
update = { max_surge = 0, max_unavailable = 2, min_healthy_time = "250ms" }
""",
    "secrets-volumes-writable": """
[services.api]
image = "web"
replicas = 4
port = 9000
listen = 80
env = { LOG_LEVEL = "debug", PORT = "1" }
secrets = ["api_key", "db.password"]
volumes = [
  { name = "uploads", path = "/srv/uploads" },
  { name = "ref", path = "/ref", readonly = true },
]
writable = ["/tmp", "/var/cache/app"]
cap_add = ["NET_BIND_SERVICE", "CAP_CHOWN"]
resources = { memory = "256MiB", cpu = 0.5 }
stop_grace = "30s"
update = { max_surge = 2, max_unavailable = 1, min_healthy_time = "5s", progress_deadline = "3s" }
health = { http = "/ready", healthy_after = 2, unhealthy_after = 4 }
""",
    "no-health-unconfined": """
[services.plain]
image = "app"
resources = { memory = 1500000, cpu = 2.0 }
seccomp = "unconfined"
""",
}


def spec_from(tmp_path: Path, services: str, recipes: str = RECIPES) -> Spec:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "kiln.toml").write_text(recipes + services)
    return load_spec(tmp_path / "kiln.toml")


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text)]


def rendered(spec: Spec, **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    return {name: documents(text) for name, text in render_spec(spec, DIGESTS, **kwargs).items()}


def template_spec() -> Spec:
    return load_spec(TEMPLATE / "kiln.toml")


def every_spec(tmp_path: Path) -> list[Spec]:
    return [template_spec()] + [spec_from(tmp_path / n, text) for n, text in SPECS.items()]


def test_every_manifest_passes_kubernetes_validate_strict(tmp_path: Path) -> None:
    kinds = set()
    for spec in every_spec(tmp_path):
        for docs in rendered(spec, registry="registry.example:5000/team").values():
            assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget"]
            for doc in docs:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                kinds.add(doc["kind"])
    assert K8S_VERSION.startswith("1.") and int(K8S_VERSION.split(".")[1]) >= 30
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget"}


def test_strict_validation_catches_a_wrong_field() -> None:
    """The validator is real: a misspelt field in the rendered Deployment is refused."""
    deployment = rendered(template_spec())["web.yaml"][0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_python_template_maps_field_by_field() -> None:
    spec = template_spec()
    deployment, service, budget = rendered(spec)["web.yaml"]
    labels = {
        "app.kubernetes.io/name": "web",
        "app.kubernetes.io/managed-by": "kiln",
        "kiln.dev/project": "hello",
    }
    assert deployment["metadata"]["labels"] == labels
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "web",
        "kiln.dev/project": "hello",
    }
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert deployment["spec"]["minReadySeconds"] == 2
    assert deployment["spec"]["progressDeadlineSeconds"] == 300
    pod = deployment["spec"]["template"]
    from kiln.deploy.plan import desired_from_spec

    config_hash = desired_from_spec(spec, DIGESTS)["web"].config_hash
    assert pod["metadata"]["annotations"] == {"kiln.dev/config-hash": config_hash}
    assert pod["metadata"]["labels"]["kiln.dev/config-hash"] == config_hash[7:39]
    container = pod["spec"]["containers"][0]
    assert container["image"] == f"web@{DIGEST}"
    assert container["env"] == [{"name": "PORT", "value": "8080"}]
    assert container["ports"] == [{"name": "app", "containerPort": 8080, "protocol": "TCP"}]
    probe = {
        "httpGet": {"path": "/healthz", "port": 8080},
        "periodSeconds": 1,
        "timeoutSeconds": 1,
        "failureThreshold": 3,
        "successThreshold": 1,
    }
    assert container["readinessProbe"] == probe
    assert container["livenessProbe"] == probe
    assert "startupProbe" not in container
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": 8080, "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }


def test_secrets_volumes_writable_caps_and_resources_map(tmp_path: Path) -> None:
    spec = spec_from(tmp_path, SPECS["secrets-volumes-writable"])
    deployment, service, budget = rendered(spec, registry="reg.local:5000/")["api.yaml"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 2, "maxUnavailable": 1}
    assert deployment["spec"]["minReadySeconds"] == 5
    # A deadline of 3 s is shorter than minReadySeconds, which the API refuses.
    assert deployment["spec"]["progressDeadlineSeconds"] == 6
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["runAsGroup"] == 2000
    container = pod["containers"][0]
    assert container["image"] == f"reg.local:5000/web@{DIGEST}"
    # Kiln's PORT wins over the service's own, as in kiln.agent.executor.
    assert container["env"] == [
        {"name": "PORT", "value": "9000"},
        {"name": "LOG_LEVEL", "value": "debug"},
    ]
    assert container["resources"] == {
        "limits": {"cpu": "500m", "memory": "256Mi"},
        "requests": {"cpu": "500m", "memory": "256Mi"},
    }
    assert container["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN", "NET_BIND_SERVICE"],
    }
    assert container["readinessProbe"]["successThreshold"] == 2
    assert container["readinessProbe"]["failureThreshold"] == 4
    assert container["livenessProbe"]["successThreshold"] == 1
    assert pod["volumes"] == [
        {
            "name": "secrets",
            "projected": {
                "defaultMode": 0o440,
                "sources": [
                    {
                        "secret": {
                            "name": "api-key",
                            "items": [{"key": "api_key", "path": "api_key"}],
                        }
                    },
                    {
                        "secret": {
                            "name": "db.password",
                            "items": [{"key": "db.password", "path": "db.password"}],
                        }
                    },
                ],
            },
        },
        {"name": "volume-0", "persistentVolumeClaim": {"claimName": "uploads", "readOnly": False}},
        {"name": "volume-1", "persistentVolumeClaim": {"claimName": "ref", "readOnly": True}},
        {"name": "writable-0", "emptyDir": {}},
        {"name": "writable-1", "emptyDir": {}},
    ]
    assert container["volumeMounts"] == [
        {"name": "secrets", "mountPath": "/run/secrets", "readOnly": True},
        {"name": "volume-0", "mountPath": "/srv/uploads", "readOnly": False},
        {"name": "volume-1", "mountPath": "/ref", "readOnly": True},
        {"name": "writable-0", "mountPath": "/tmp"},
        {"name": "writable-1", "mountPath": "/var/cache/app"},
    ]
    assert service["spec"]["ports"][0]["port"] == 80
    assert service["spec"]["ports"][0]["targetPort"] == 9000
    assert budget["spec"]["maxUnavailable"] == 1


def test_tcp_exec_and_no_health_probes(tmp_path: Path) -> None:
    cache = rendered(spec_from(tmp_path / "c", SPECS["redis-tcp"]))["cache.yaml"]
    container = cache[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"] == {
        "tcpSocket": {"port": 6379},
        "periodSeconds": 2,
        "timeoutSeconds": 1,  # 500 ms rounds up to Kubernetes' whole second
        "successThreshold": 1,
        "failureThreshold": 5,
    }
    assert cache[0]["spec"]["template"]["spec"]["volumes"] == [
        {
            "name": "volume-0",
            "persistentVolumeClaim": {"claimName": "cache-data", "readOnly": False},
        }
    ]
    assert cache[1]["spec"]["ports"][0] == {
        "name": "tcp",
        "port": 6379,
        "targetPort": 6379,
        "protocol": "TCP",
    }
    worker = rendered(spec_from(tmp_path / "w", SPECS["exec-health"]))["worker.yaml"]
    spec = worker[0]["spec"]
    container = spec["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["exec"] == {"command": ["/bin/check", "--quick"]}
    assert container["startupProbe"]["exec"] == {"command": ["/bin/check", "--quick"]}
    # 10 s of start period at 2 s a probe, then the usual 3 failures.
    assert container["startupProbe"]["failureThreshold"] == 5 + 3
    assert spec["template"]["spec"]["securityContext"]["runAsUser"] == 65534
    assert spec["minReadySeconds"] == 1
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 2}
    assert worker[2]["spec"]["maxUnavailable"] == 2
    plain = rendered(spec_from(tmp_path / "p", SPECS["no-health-unconfined"]))["plain.yaml"]
    pod = plain[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["readinessProbe"]["tcpSocket"] == {"port": 8080}
    assert pod["containers"][0]["image"] == "app@sha256:" + "ef" * 32
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "1500000"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "Unconfined"}


@pytest.mark.parametrize(
    ("replicas", "max_unavailable", "budget"),
    [(1, 0, 1), (0, 0, 1), (3, 0, 1), (3, 1, 1), (5, 3, 3), (3, 5, 2)],
)
def test_the_disruption_budget_always_lets_a_drain_evict_one_never_all(
    tmp_path: Path, replicas: int, max_unavailable: int, budget: int
) -> None:
    surge = 1 if max_unavailable == 0 else 0
    spec = spec_from(
        tmp_path,
        f'[services.web]\nimage = "web"\nreplicas = {replicas}\n'
        f"update = {{ max_surge = {surge}, max_unavailable = {max_unavailable} }}\n",
    )
    pdb = rendered(spec)["web.yaml"][2]
    assert pdb["spec"]["maxUnavailable"] == budget
    kubernetes_validate.validate(pdb, K8S_VERSION, strict=True)


def test_rendering_is_byte_identical_for_the_same_input(tmp_path: Path) -> None:
    for spec in every_spec(tmp_path):
        first = render_spec(
            spec, DIGESTS, registry="r.example/x", secrets_versions={"api_key": "v2"}
        )
        again = load_spec(spec.path)
        second = render_spec(
            again, DIGESTS, registry="r.example/x", secrets_versions={"api_key": "v2"}
        )
        assert first == second
    spec = spec_from(tmp_path / "s", SPECS["secrets-volumes-writable"])
    v1 = render_spec(spec, DIGESTS, secrets_versions={"api_key": "v1", "db.password": "v1"})
    v2 = render_spec(spec, DIGESTS, secrets_versions={"api_key": "v2", "db.password": "v1"})
    # A rotated secret is a new config hash, so the pods roll, as kiln apply would replace them.
    assert v1 != v2
    other_digest = render_spec(spec, {**DIGESTS, "web": "sha256:" + "99" * 32})
    assert "sha256:" + "99" * 32 in other_digest["api.yaml"]


HOSTILE = [
    'x"\n---\nkind: Secret\nmetadata: {name: pwned}',
    "line\r\nbreak\u2028sep\u2029para\x85nel",
    "'single' \"double\" \\back\\ # not a comment: {a: [b]} & *alias !tag %dir",
    "\x07\x1b[31m\x7f\ufeff\t",
    "yes",
    "8080",
    "é ünïcødé 🙂",
]


def test_hostile_env_values_paths_and_commands_stay_inside_their_strings(tmp_path: Path) -> None:
    toml = (
        '[services.web]\nimage = "web"\n'
        f"env = {{ {_toml_inline(HOSTILE)} }}\n"
        f"health = {{ exec = [{', '.join(_toml_str(v) for v in HOSTILE)}] }}\n"
        f"writable = [{', '.join(_toml_str('/' + v) for v in HOSTILE)}]\n"
    )
    spec = spec_from(tmp_path, toml)
    text = render_spec(spec, DIGESTS)["web.yaml"]
    docs = documents(text)
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget"]
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["env"][1:] == [{"name": f"V{i}", "value": v} for i, v in enumerate(HOSTILE)]
    assert container["livenessProbe"]["exec"]["command"] == HOSTILE
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/" + v for v in HOSTILE]
    # No value began a line of its own: the only separators are the two Kiln wrote.
    assert [line for line in text.splitlines() if line.lstrip().startswith("---")] == ["---"] * 2
    assert "\nkind: Secret" not in text and "\\nkind: Secret" in text
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _toml_str(value: str) -> str:
    return '"' + "".join(c if c.isalnum() or c in " /" else f"\\U{ord(c):08x}" for c in value) + '"'


def _toml_inline(values: list[str]) -> str:
    return ", ".join(f"V{i} = {_toml_str(v)}" for i, v in enumerate(values))


@settings(max_examples=300, deadline=None)
@given(st.text(), st.dictionaries(st.text(min_size=1), st.text(), max_size=4))
def test_any_text_round_trips_through_the_yaml_writer(value: str, mapping: dict[str, str]) -> None:
    document = {"value": value, "list": [value, {"k": value}], "map": mapping, "n": 3, "b": True}
    assert yaml.safe_load(dump_yaml(document)) == document


@pytest.mark.parametrize(
    ("services", "message"),
    [
        ('[services."we b\\n---"]\nimage = "web"\n', "DNS label"),
        ('[services.web_api]\nimage = "web"\n', "DNS label"),
        ('[services.1web]\nimage = "web"\n', "DNS label"),
        ('[services.web]\nimage = "web"\nsecrets = ["a_b", "a-b"]\n', "both the Kubernetes Secret"),
        ('[services.web]\nimage = "web"\nsecrets = ["Bad"]\n', "Kubernetes object name"),
    ],
)
def test_names_kubernetes_cannot_hold_are_refused_in_one_line(
    tmp_path: Path, services: str, message: str
) -> None:
    spec = spec_from(tmp_path, services)
    with pytest.raises(KilnError, match=message) as caught:
        render_spec(spec, DIGESTS)
    assert "\n" not in str(caught.value).replace("\\n", "")


@pytest.mark.parametrize(
    ("user", "message"),
    [('"app"', "is a name"), ('"0:0"', "root cannot run"), ('"root"', "is a name")],
)
def test_images_that_would_run_as_root_or_by_name_are_refused(
    tmp_path: Path, user: str, message: str
) -> None:
    recipes = f'[project]\nname = "p"\n[images.web]\nfrom = "scratch"\nuser = {user}\n'
    spec = spec_from(tmp_path, '[services.web]\nimage = "web"\n', recipes)
    with pytest.raises(KilnError, match=message):
        render_spec(spec, DIGESTS)


def test_a_project_name_that_is_no_label_value_and_a_bad_registry_are_refused(
    tmp_path: Path,
) -> None:
    recipes = '[project]\nname = "shop-"\n[images.web]\nfrom = "scratch"\n'
    spec = spec_from(tmp_path / "a", '[services.web]\nimage = "web"\n', recipes)
    with pytest.raises(KilnError, match="label value"):
        render_spec(spec, DIGESTS)
    spec = spec_from(tmp_path / "b", '[services.web]\nimage = "web"\n')
    for registry in ("https://reg.example", "reg example", "reg.example/\n---", "REG/UPPER"):
        with pytest.raises(KilnError, match="--registry"):
            render_spec(spec, DIGESTS, registry=registry)


# --- the CLI and render_project: a real bake of a scratch image holding busybox ---

needs_busybox = pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static not installed")

BUSYBOX_PROJECT = """[project]
name = "bb"

[images.bb]
from = "scratch"
steps = [{ copy = "rootfs/", to = "/" }]
user = "65534:65534"
cmd = ["/bin/busybox", "httpd", "-f", "-p", "8080"]

[services.web]
image = "bb"
replicas = 2
secrets = ["token"]
health = { http = "/" }

[environments.prod.services.web]
replicas = 5
"""


def busybox_project(root: Path) -> Path:
    (root / "rootfs" / "bin").mkdir(parents=True)
    shutil.copyfile(BUSYBOX, root / "rootfs" / "bin" / "busybox")
    os.chmod(root / "rootfs" / "bin" / "busybox", 0o755)
    (root / "kiln.toml").write_text(BUSYBOX_PROJECT)
    return root


def kiln(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KILN_SECRET_KEY"}
    env["KILN_HOME"] = str(home)
    return subprocess.run(
        [KILN, *args], env=env, cwd=cwd, text=True, capture_output=True, timeout=300
    )


@needs_busybox
def test_cli_bakes_writes_one_file_per_service_and_never_a_secret_value(tmp_path: Path) -> None:
    project, home = busybox_project(tmp_path / "p"), tmp_path / "home"
    secret = b"hunter2-\xe2\x98\x83-very-secret-value"
    home.mkdir(mode=0o700)
    SecretStore(home / "secrets").set("token", secret)
    out = kiln(
        home,
        "render",
        "kubernetes",
        ".",
        "-o",
        str(tmp_path / "k8s"),
        "--env",
        "prod",
        "--registry",
        "127.0.0.1:5000/kiln",
        cwd=project,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"wrote {tmp_path / 'k8s' / 'web.yaml'}\n"
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == ["web.yaml"]
    raw = (tmp_path / "k8s" / "web.yaml").read_bytes()
    for form in (secret, base64.b64encode(secret), secret.hex().encode(), b"hunter2"):
        assert form not in raw
    docs = documents(raw.decode())
    deployment = docs[0]
    assert deployment["spec"]["replicas"] == 5
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    baked = kiln(home, "bake", cwd=project)
    assert baked.returncode == 0, baked.stderr
    assert image == "127.0.0.1:5000/kiln/" + baked.stdout.strip()  # bb@sha256:…
    assert deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"] == [
        {"secret": {"name": "token", "items": [{"key": "token", "path": "token"}]}}
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    again = kiln(
        home,
        "render",
        "kubernetes",
        "-o",
        str(tmp_path / "k8s2"),
        "--env",
        "prod",
        "--registry",
        "127.0.0.1:5000/kiln",
        cwd=project,
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "k8s2" / "web.yaml").read_bytes() == raw


@needs_busybox
def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    project, home = busybox_project(tmp_path / "p"), tmp_path / "home"
    missing = kiln(home, "render", "kubernetes", "-o", str(tmp_path / "no" / "such"), cwd=project)
    assert missing.returncode == 1
    assert (
        missing.stderr == f"error: -o {tmp_path / 'no' / 'such'}: the directory "
        f"{tmp_path / 'no'} does not exist\n"
    )
    (tmp_path / "file").write_text("x")
    not_dir = kiln(home, "render", "kubernetes", "-o", str(tmp_path / "file"), cwd=project)
    assert not_dir.returncode == 1 and not_dir.stderr.endswith("not a directory\n")
    bad_env = kiln(
        home, "render", "kubernetes", "-o", str(tmp_path / "k"), "-e", "nope", cwd=project
    )
    assert bad_env.returncode == 1
    assert bad_env.stderr.startswith("error: ") and "no such environment" in bad_env.stderr
    bad_registry = kiln(
        home,
        "render",
        "kubernetes",
        "-o",
        str(tmp_path / "k"),
        "--registry",
        "http://x",
        cwd=project,
    )
    assert bad_registry.returncode == 1 and "--registry" in bad_registry.stderr
    assert not (tmp_path / "k").exists()
    helped = kiln(home, "render", "kubernetes", "--help", cwd=project)
    assert helped.returncode == 0 and "HOST[:PORT][/PREFIX]" in helped.stdout
    no_output = kiln(home, "render", "kubernetes", cwd=project)
    assert no_output.returncode == 2 and "--output" in no_output.stderr


def test_render_project_refuses_before_baking_when_the_parent_is_missing(tmp_path: Path) -> None:
    spec_from(tmp_path / "p", '[services.web]\nimage = "web"\n')
    with pytest.raises(KilnError, match="does not exist"):
        render_project(tmp_path / "p", None, tmp_path / "a" / "b", home=tmp_path / "home")
    assert not (tmp_path / "home").exists()
