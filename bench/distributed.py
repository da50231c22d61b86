"""Beyond one machine: figures for issue 10, one section per function.

Run: ``.venv/bin/python bench/distributed.py [--only registry] [--runs 3] [--mb 100]``.

* ``registry``: push and pull throughput of one image of ``--mb`` MB in four
  incompressible layers against a local ``docker-registry`` started here (TLS from a
  CA made here, on 127.0.0.1). Kiln's ``push``/``pull`` (chunked upload, every pulled
  blob hashed before it reaches the store) next to ``skopeo copy`` of the same image:
  ``oci:`` layout → ``docker://`` and back into a fresh ``oci:`` layout. Every run
  has a registry of its own and pulls into an empty store or layout, so no blob is
  skipped or mounted on either side.

* ``swarm``: a real three-node swarm on this machine (tests/swarm_cluster.py:
  network namespaces, nsenter'd engines, a TLS registry). Kiln deploys the shop
  example (``--replicas`` instances) with ``[runtime] kind = "swarm"`` and its edges,
  then times a rollout under load through the edge of node 2, SIGKILL recoveries
  and a lost node (failed requests counted through an edge). Then Swarm's own
  service of the same image, configured as Kiln is: parallelism = ``max_surge``,
  ``--update-order start-first`` = ``max_unavailable = 0``, ``--update-monitor 1s`` =
  ``min_healthy_time``, health every 1 s with a 1 s timeout and 3 retries = Kiln's
  ``health`` (Swarm can only check by exec in the task: bash's /dev/tcp, the
  cheapest probe the image has), ``--stop-grace-period 5s``, restart delay 0.

On a shared 2-core machine the client, the registry and TLS compete for CPU: the
ratios matter more than the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_p95, swarm_healthy_tasks, swarm_service_create

from kiln.image.digest import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST, canonical_json
from kiln.image.layer import layer_from_dir
from kiln.image.registry import RegistryOptions, pull, push
from kiln.image.store import ImageStore

REPO = Path(__file__).resolve().parents[1]
REGISTRY_BIN = Path("/usr/bin/docker-registry")
LAYERS = 4
IMAGE_REF = "bench:1"


def row(label: str, samples: list[float], megabytes: float, peer: list[float] | None) -> None:
    med, p95 = median_p95(samples)
    text = (
        f"{label:<30} median {med:6.2f} s  p95 {p95:6.2f} s  "
        f"{megabytes / med:7.1f} MB/s  (n={len(samples)})"
    )
    if peer:
        text += f"   ratio kiln/skopeo (time) {med / median_p95(peer)[0]:.2f}"
    print(text, flush=True)


# -- a registry on loopback --------------------------------------------------------


@dataclass
class LocalRegistry:
    host: str
    ca_file: Path
    cert_dir: Path
    """A directory with ``ca.crt``: what skopeo's ``--*-cert-dir`` wants."""


def _tests_on_path() -> None:
    """The tests' helpers (certificates, a free port, the registry, the swarm) serve here too."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))


def _free_port() -> int:
    _tests_on_path()
    from busybox_tree import free_port

    return free_port()


@contextlib.contextmanager
def local_registry(root: Path) -> Iterator[LocalRegistry]:
    """docker-registry with TLS on 127.0.0.1, its storage under ``root``; stopped after."""
    _tests_on_path()
    from registry_server import serve_registry
    from tls_certs import make_ca, make_server_cert

    ca_path, ca_key, ca_cert = make_ca(root, "kiln-bench-ca")
    cert, key = make_server_cert(root, ca_key, ca_cert)
    cert_dir = root / "certs.d"
    cert_dir.mkdir(parents=True)
    ca_file = cert_dir / "ca.crt"
    shutil.copy(ca_path, ca_file)
    port = _free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": "kiln-bench",
            "tls": {"certificate": str(cert), "key": str(key)},
        },
    }
    with serve_registry(root, config, port, ca_file):
        yield LocalRegistry(f"127.0.0.1:{port}", ca_file, cert_dir)


# -- the image ---------------------------------------------------------------------


def make_image(store: ImageStore, work: Path, megabytes: int) -> int:
    """``bench:1``: LAYERS layers of random bytes (gzip cannot shrink them); its size."""
    layers = []
    for index in range(LAYERS):
        tree = work / f"layer-{index}"
        (tree / "data").mkdir(parents=True)
        with open(tree / "data" / f"blob-{index}.bin", "wb") as out:
            remaining = megabytes * 1_000_000 // LAYERS
            while remaining > 0:
                chunk = os.urandom(min(remaining, 1 << 20))
                out.write(chunk)
                remaining -= len(chunk)
        layers.append(layer_from_dir(tree, store, 0))
        shutil.rmtree(tree)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    config_desc = store.put_bytes(canonical_json(config), MEDIA_TYPE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [layer.descriptor.to_json() for layer in layers],
    }
    store.tag(IMAGE_REF, store.put_bytes(canonical_json(manifest), MEDIA_TYPE_MANIFEST))
    return sum(layer.descriptor.size for layer in layers) + config_desc.size


# -- sections ------------------------------------------------------------------------


def registry_section(runs: int, megabytes: int) -> None:
    if not REGISTRY_BIN.exists():
        print("registry: skipped (docker-registry not installed)")
        return
    skopeo = shutil.which("skopeo")
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-registry-"))
    try:
        store = ImageStore(work / "store")
        size = make_image(store, work, megabytes)
        mb = size / 1e6
        print(f"registry: image {IMAGE_REF}, {LAYERS} layers, {mb:.1f} MB; TLS on loopback")
        counter = iter(range(1_000_000))

        def kiln_once(registry: LocalRegistry) -> tuple[float, float]:
            options = RegistryOptions(ca_file=registry.ca_file)
            dest = f"{registry.host}/kiln/bench:1"
            target = ImageStore(work / f"pulled-{next(counter)}")
            pushed = timed(lambda: push(store, IMAGE_REF, dest, options))
            pulled = timed(lambda: pull(target, dest, options))
            shutil.rmtree(target.root)
            return pushed, pulled

        def skopeo_once(registry: LocalRegistry) -> tuple[float, float]:
            dest = f"{registry.host}/skopeo/bench:1"
            layout = work / f"layout-{next(counter)}"
            certs = str(registry.cert_dir)
            source = f"oci:{store.root}:{IMAGE_REF}"
            pushed = timed(
                lambda: skopeo_copy(source, f"docker://{dest}", "--dest-cert-dir", certs)
            )
            back = f"oci:{layout}:{IMAGE_REF}"
            pulled = timed(lambda: skopeo_copy(f"docker://{dest}", back, "--src-cert-dir", certs))
            shutil.rmtree(layout)
            return pushed, pulled

        kiln_pushes, kiln_pulls = on_fresh_registries(work, kiln_once, runs)
        skopeo_pushes: list[float] | None = None
        skopeo_pulls: list[float] | None = None
        if skopeo:
            skopeo_pushes, skopeo_pulls = on_fresh_registries(work, skopeo_once, runs)
        row("kiln push", kiln_pushes, mb, skopeo_pushes)
        row("kiln pull", kiln_pulls, mb, skopeo_pulls)
        if skopeo_pushes and skopeo_pulls:
            row("skopeo copy oci: → docker://", skopeo_pushes, mb, None)
            row("skopeo copy docker:// → oci:", skopeo_pulls, mb, None)
        else:
            print("skopeo: not installed; no peer figures")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def on_fresh_registries(
    work: Path, once: Callable[[LocalRegistry], tuple[float, float]], runs: int
) -> tuple[list[float], list[float]]:
    """Each run against a registry of its own (new storage, new port): nothing is already
    there, and skopeo's blob-info cache cannot turn an upload into a cross-repo mount."""
    pushes, pulls = [], []
    for _ in range(runs):
        root = Path(tempfile.mkdtemp(dir=work, prefix="registry-"))
        with local_registry(root) as registry:
            pushed, pulled = once(registry)
        shutil.rmtree(root, ignore_errors=True)
        pushes.append(pushed)
        pulls.append(pulled)
    return pushes, pulls


def skopeo_copy(src: str, dest: str, *flags: str) -> None:
    done = subprocess.run(
        ["skopeo", "copy", "--quiet", *flags, src, dest], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"skopeo copy {src} {dest} failed: {done.stderr.strip()}")


# -- the Swarm sections: Kiln on a three-node swarm, next to Swarm's own update -----

SWARM_TOML = """\
[project]
name = "dist"

[runtime]
kind = "swarm"
host = "{host}"
registry = "{registry}/dist"

[registries."{registry}"]
ca = "{ca}"

[images.web]
from = "debian:bookworm"
packages = ["python3-minimal"]
steps = [{{ copy = "app/", to = "/srv/app" }}]
env = {{ PYTHONUNBUFFERED = "1" }}
user = "65534:65534"
workdir = "/srv/app"
cmd = ["python3", "server.py"]

[services.web]
image = "web"
replicas = {replicas}
listen = {listen}
health = {{ http = "/healthz", interval = "1s", timeout = "1s", unhealthy_after = 3 }}
env = {{ GREETING = "{greeting}" }}
stop_grace = "5s"
drain_timeout = "5s"
update = {{ max_surge = {surge}, max_unavailable = 0, min_healthy_time = "1s" }}
heal = {{ meltdown_fraction = 100.0 }}
"""
SWARM_HEALTH_CMD = (
    # bash's /dev/tcp, not python3: thirty python3 start-ups a second do not fit in a
    # 1 s timeout on two cores, and Swarm can only check health by exec in the task.
    'bash -c \'exec 3<>/dev/tcp/127.0.0.1/$PORT && printf "GET /healthz HTTP/1.0\\r\\n\\r\\n" >&3'
    ' && grep -q " 200 " <&3\''
)


def kiln_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "kiln"), *args],
        env=dict(os.environ, KILN_HOME=str(home)),
        text=True,
        capture_output=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def ready_instances(home: Path) -> list[dict[str, Any]]:
    from kiln.agent.client import AgentClient

    with AgentClient(home, addr="") as client:
        found = client.status()["services"]["web"]["instances"]
    return [i for i in found if i["state"] == "ready"]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - start


def node_of(cluster: Any, address: str) -> Any:
    host = address.rpartition(":")[0]
    return next(n for n in cluster.nodes if n.address == host)


def kiln_on_swarm(
    cluster: Any, work: Path, replicas: int, surge: int, kills: int
) -> dict[str, Any]:
    """Kiln: up, a rollout under load through an edge, SIGKILLs, a lost node."""
    from kiln.observe.load import LoadGenerator

    project, home = work / "project", work / "home"
    listen = _free_port()
    shutil.copytree(REPO / "examples" / "shop" / "app", project / "app")

    def write(greeting: str) -> None:
        (project / "kiln.toml").write_text(
            SWARM_TOML.format(
                host=cluster.manager.host,
                registry=cluster.registry,
                ca=cluster.registry_ca,
                replicas=replicas,
                listen=listen,
                greeting=greeting,
                surge=surge,
            )
        )

    write("v0")
    home.mkdir(mode=0o700)
    log = open(home / "agent-fg.log", "wb")  # noqa: SIM115 - the agent outlives this block
    agent = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "kiln"),
            "agent",
            "--listen",
            f"{cluster.gateway}:{_free_port()}",
            "--file",
            str(project),
        ],
        env=dict(os.environ, KILN_HOME=str(home)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    figures: dict[str, Any] = {"kills": [], "kill_failed": 0, "kill_sent": 0}
    try:
        wait_until(lambda: (home / "agent.sock").exists(), 30, "agent socket")
        start = time.perf_counter()
        kiln_cli(home, "up", str(project), "--yes")
        figures["up"] = time.perf_counter() - start
        edge = cluster.nodes[1].address
        wait_until(lambda: _answers(edge, listen), 300, "the edge of node 2")
        print(f"  kiln up, {replicas} instances on 3 nodes: {figures['up']:.1f} s", flush=True)

        write("v1")
        with LoadGenerator(edge, listen, workers=4) as load:
            time.sleep(0.5)
            start = time.perf_counter()
            kiln_cli(home, "apply", "--file", str(project), "--yes")
            figures["rollout"] = time.perf_counter() - start
            time.sleep(0.5)
        figures["rollout_failed"], figures["rollout_sent"] = load.report.failed, load.report.sent
        print(
            f"  kiln rollout {replicas} instances, surge {surge}: {figures['rollout']:.1f} s; "
            f"through the edge of node 2: {load.report.summary()}",
            flush=True,
        )
        for n in range(kills):
            victim = ready_instances(home)[n % replicas]
            node = node_of(cluster, victim["address"])
            container = cluster.containers(node, f"dev.kiln.instance={victim['id']}")[0]
            with LoadGenerator(edge, listen, workers=2) as load:
                node.docker("kill", "-s", "KILL", container["Id"])
                took = wait_until(
                    lambda v=victim: _replaced(ready_instances(home), replicas, v["id"]),
                    120,
                    "kiln: a SIGKILLed instance replaced",
                )
            figures["kills"].append(took)
            figures["kill_failed"] += load.report.failed
            figures["kill_sent"] += load.report.sent
            print(f"  kiln SIGKILL {n + 1}: replaced in {took:.2f} s; {load.report.summary()}")
        lost = cluster.nodes[2]
        with LoadGenerator(cluster.manager.address, listen, workers=2) as load:
            cluster.cut(lost)
            took = wait_until(
                lambda: _off_node(ready_instances(home), replicas, lost.address),
                300,
                "kiln: back to full strength after a lost node",
            )
        figures["node"], figures["node_failed"] = took, load.report.failed
        figures["node_sent"] = load.report.sent
        print(f"  kiln node lost: full strength in {took:.1f} s; {load.report.summary()}")
        cluster.restore(lost)
        cluster.wait_node_state(lost, "ready", timeout=90)
        digest = str(ready_instances(home)[0]["digest"])
        figures["image"] = f"{cluster.registry}/dist/web@{digest}"
    finally:
        subprocess.run(
            [str(Path(sys.executable).parent / "kiln"), "down"],
            env=dict(os.environ, KILN_HOME=str(home)),
            capture_output=True,
        )
        if agent.poll() is None:
            agent.terminate()
            agent.wait(30)
    return figures


def _replaced(ready: list[dict[str, Any]], replicas: int, victim: str) -> bool:
    """One snapshot: full strength, and the victim no longer among the ready."""
    return len(ready) >= replicas and victim not in {i["id"] for i in ready}


def _off_node(ready: list[dict[str, Any]], replicas: int, address: str) -> bool:
    return len(ready) >= replicas and not any(i["address"].startswith(address + ":") for i in ready)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            return b" 200 " in s.recv(64)
    except OSError:
        return False


def _healthy(cluster: Any, name: str) -> list[str]:
    found: list[str] = []
    for node in cluster.nodes:
        if node.index in cluster.cut_nodes:
            continue
        found += swarm_healthy_tasks(node.docker, name)
    return found


def _replaced_task(healthy: list[str], replicas: int, victim: str) -> bool:
    return len(healthy) >= replicas and victim not in healthy


def swarm_peer(cluster: Any, image: str, replicas: int, surge: int, kills: int) -> dict[str, Any]:
    """Swarm's own service of the same image, the same health and update settings."""
    name = "peer"
    manager = cluster.manager
    swarm_service_create(
        manager.docker,
        name,
        image,
        replicas,
        health_cmd=SWARM_HEALTH_CMD,
        interval=1.0,
        timeout=1.0,
        retries=3,
        parallelism=surge,
        # Swarm's monitor period is Kiln's min_healthy_time (its default is 5 s).
        monitor=1.0,
        stop_grace=5.0,
        env={"PORT": "8080", "GREETING": "v0"},
        extra=("--endpoint-mode", "dnsrr", "--publish", "mode=host,target=8080"),
    )
    figures: dict[str, Any] = {"kills": []}
    try:
        start = time.perf_counter()
        wait_until(lambda: len(_healthy(cluster, name)) >= replicas, 300, "swarm: create")
        figures["up"] = time.perf_counter() - start
        print(f"  swarm create {replicas} replicas: {figures['up']:.1f} s", flush=True)
        start = time.perf_counter()
        manager.docker("service", "update", "--detach=false", "--env-add", "GREETING=v1", name)
        figures["rollout"] = time.perf_counter() - start
        print(
            f"  swarm update {replicas} replicas, parallelism {surge}: {figures['rollout']:.1f} s",
            flush=True,
        )
        for n in range(kills):
            # Exactly full strength: just after an update, old tasks still healthy are
            # being stopped, and one of them would be no victim at all.
            wait_until(lambda: len(_healthy(cluster, name)) == replicas, 120, "swarm: healthy")
            victim = _healthy(cluster, name)[n % replicas]
            node = next(
                nd
                for nd in cluster.nodes
                if nd.index not in cluster.cut_nodes and victim in nd.docker("ps", "-q").split()
            )
            try:
                node.docker("kill", "-s", "KILL", victim)
            except RuntimeError:
                continue  # it stopped between the listing and the kill: pick again
            took = wait_until(
                lambda v=victim: _replaced_task(_healthy(cluster, name), replicas, v),
                120,
                "swarm: a SIGKILLed task replaced",
            )
            figures["kills"].append(took)
            print(f"  swarm SIGKILL {n + 1}: replaced in {took:.2f} s", flush=True)
        lost = cluster.nodes[2]
        cluster.cut(lost)
        figures["node"] = wait_until(
            lambda: len(_healthy(cluster, name)) >= replicas, 300, "swarm: after a lost node"
        )
        print(f"  swarm node lost: full strength in {figures['node']:.1f} s", flush=True)
        cluster.restore(lost)
        cluster.wait_node_state(lost, "ready", timeout=90)
    finally:
        manager.docker("service", "rm", name)
    return figures


def swarm_section(replicas: int, surge: int, kills: int) -> None:
    """One swarm for both: Kiln first (then kiln down), then Swarm's own service."""
    _tests_on_path()
    from swarm_cluster import start_cluster

    work = Path(tempfile.mkdtemp(prefix="kiln-dist-"))
    cluster = start_cluster()
    try:
        kiln_figures = kiln_on_swarm(cluster, work, replicas, surge, kills)
        peer = swarm_peer(cluster, kiln_figures["image"], replicas, surge, kills)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{replicas} instances on 3 nodes, surge/parallelism {surge}, health every 1 s, "
        "min_healthy_time = update-monitor = 1 s, start-first"
    )
    print(
        f"{'rollout (s)':<40} kiln {kiln_figures['rollout']:7.1f}  swarm {peer['rollout']:7.1f}"
        f"  kiln/swarm {kiln_figures['rollout'] / peer['rollout']:.2f}"
    )
    for label, key in (("SIGKILL recovery (s)", "kills"),):
        km, kp = median_p95(kiln_figures[key])
        sm, sp = median_p95(peer[key])
        print(
            f"{label:<40} kiln median {km:5.2f} p95 {kp:5.2f}  swarm median {sm:5.2f} "
            f"p95 {sp:5.2f}  kiln/swarm {km / sm:.2f}"
        )
    print(
        f"{'node lost → full strength (s)':<40} kiln {kiln_figures['node']:7.1f}  "
        f"swarm {peer['node']:7.1f}  kiln/swarm {kiln_figures['node'] / peer['node']:.2f}"
    )
    print(
        f"{'failed requests, rollout':<40} kiln {kiln_figures['rollout_failed']} of "
        f"{kiln_figures['rollout_sent']} (through an edge)"
    )
    print(
        f"{'failed requests, SIGKILLs':<40} kiln {kiln_figures['kill_failed']} of "
        f"{kiln_figures['kill_sent']}"
    )
    print(
        f"{'failed requests, node lost':<40} kiln {kiln_figures['node_failed']} of "
        f"{kiln_figures['node_sent']}"
    )
    print(
        "swarm: no failed-request figure (no routing mesh without IPVS; Kiln's edges route "
        "only Kiln's instances)"
    )


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "registry": lambda args: registry_section(args.runs, args.mb),
    "swarm": lambda args: swarm_section(args.replicas, args.surge, args.kills),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), help="a section")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure")
    parser.add_argument("--mb", type=int, default=100, help="registry: image size in MB")
    parser.add_argument("--replicas", type=int, default=30, help="swarm: instances")
    parser.add_argument("--surge", type=int, default=5, help="swarm: max_surge = parallelism")
    parser.add_argument("--kills", type=int, default=3, help="swarm: SIGKILLs of each")
    args = parser.parse_args()
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
