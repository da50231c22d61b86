"""Sandbox benchmark: instance start time and per-instance memory overhead.

* start: from ``runtime.start`` to the first HTTP 200 from the app at its own
  address (what a health check sees first), median and p95 over runs;
* overhead: the proportional set size (PSS) of what each instance costs
  besides the app itself — Kiln's shim and the container's init (tini); for
  Docker, the containerd shim and docker-init — with 10 instances running.

The peer is a private Docker engine started here with the same settings as
Kiln's sandbox: a user namespace (``--userns-remap=default``), a bridge the
host reaches directly, ``--init``, read-only root with tmpfs /tmp and /run,
no capabilities, no-new-privileges, pids limit 1024.

Run: .venv/bin/python bench/sandbox.py [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import docker, median_p95, private_dockerd

from busybox_tree import build_busybox_rootfs
from kiln.image.snapshots import shift_tree
from kiln.oci.idmap import id_range
from kiln.runtime import InstanceSpec
from kiln.runtime.local import LocalRuntime

APP = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
INSTANCES = 10
BRIDGE = "kbench0"
BRIDGE_NET = "10.214.77"


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=0.5) as response:
            if response.status == 200:
                return
        time.sleep(0.002)
    raise TimeoutError(url)


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def kiln_figures(tree: Path, runs: int) -> tuple[list[float], list[float]]:
    home = Path(tempfile.mkdtemp(prefix="kiln-bench-sandbox-"))
    home.chmod(0o700)
    ids = id_range(home)
    layer = home / "layer"
    shutil.copytree(tree, layer, symlinks=True)
    shift_tree(layer, ids, "bench")
    runtime = LocalRuntime(home)

    def spec(n: int) -> InstanceSpec:
        return InstanceSpec(
            instance_id=f"web-{n}",
            service="web",
            revision=1,
            image_digest="sha256:" + "0" * 64,
            layers=(layer,),
            command=APP,
            user="65534:65534",
            workdir="/",
            env={"PATH": "/bin", "PORT": "8080"},
            port=8080,
            stop_grace=1.0,
        )

    starts = []
    try:
        for n in range(runs):
            began = time.perf_counter()
            handle = runtime.start(spec(n))
            wait_http(f"http://{handle.host}:8080/index.html")
            starts.append(time.perf_counter() - began)
            runtime.destroy(handle)
        handles = [runtime.start(spec(100 + n)) for n in range(INSTANCES)]
        for handle in handles:
            wait_http(f"http://{handle.host}:8080/index.html")
        overhead = []
        for handle in handles:
            shim = int(handle.data["shim_pid"])
            init = int(handle.data["sandbox_pid"])
            overhead.append((pss_kib(shim) + pss_kib(init)) / 1024)
        for handle in handles:
            runtime.destroy(handle)
        runtime.shutdown()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return starts, overhead


@contextlib.contextmanager
def bridged_dockerd() -> Iterator[str | None]:
    """A private engine on a bridge the host reaches, with user-namespace remapping."""
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], capture_output=True)
    subprocess.run(["ip", "addr", "add", f"{BRIDGE_NET}.1/24", "dev", BRIDGE], capture_output=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], capture_output=True)
    try:
        with private_dockerd(bridge=BRIDGE, userns=True) as host:
            yield host
    finally:
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)


def docker_figures(tree: Path, runs: int) -> tuple[list[float], list[float]] | None:
    with bridged_dockerd() as host:
        if host is None:
            print("docker: no engine could start here; no peer figures", flush=True)
            return None
        archive = Path(tempfile.mkdtemp()) / "tree.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(tree, arcname=".")
        docker(host, "import", str(archive), "kiln-bench-busybox:1")
        run = [
            "run", "-d", "--init", "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/run",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--pids-limit", "1024",
            "--user", "65534:65534", "-e", "PATH=/bin", "-e", "PORT=8080",
            "kiln-bench-busybox:1", *APP,
        ]  # fmt: skip
        starts = []
        for _ in range(runs):
            began = time.perf_counter()
            cid = docker(host, *run).stdout.strip()
            ip = docker(host, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid).stdout.strip()
            wait_http(f"http://{ip}:8080/index.html")
            starts.append(time.perf_counter() - began)
            docker(host, "rm", "-f", cid)
        cids = [docker(host, *run).stdout.strip() for _ in range(INSTANCES)]
        overhead = []
        for cid in cids:
            ip = docker(host, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid).stdout
            wait_http(f"http://{ip.strip()}:8080/index.html")
            init = int(docker(host, "inspect", "-f", "{{.State.Pid}}", cid).stdout.strip())
            stat = Path(f"/proc/{init}/stat").read_text()
            shim = int(stat[stat.rindex(")") + 2 :].split()[1])
            overhead.append((pss_kib(shim) + pss_kib(init)) / 1024)
        docker(host, "rm", "-f", *cids)
        return starts, overhead


def row(label: str, samples: list[float], unit: str, peer: list[float] | None) -> None:
    med, p95 = median_p95(samples)
    scale = 1000 if unit == "ms" else 1
    text = f"{label:<44} median {med * scale:8.1f} {unit}  p95 {p95 * scale:8.1f} {unit}"
    if peer:
        text += f"   ratio kiln/docker {med / median_p95(peer)[0]:.2f}"
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-tree-"))
    tree = build_busybox_rootfs(work / "tree", www={"index.html": "hello\n"})
    try:
        kiln_start, kiln_mem = kiln_figures(tree, args.runs)
        peer = docker_figures(tree, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    docker_start, docker_mem = peer if peer else (None, None)
    print(f"instance start to first HTTP 200, {args.runs} runs; overhead PSS of {INSTANCES}")
    row("kiln: start → first 200", kiln_start, "ms", docker_start)
    row("kiln: per-instance overhead (shim + init)", kiln_mem, "MiB", docker_mem)
    if docker_start and docker_mem:
        row("docker run --init → first 200 (incl. inspect)", docker_start, "ms", None)
        row("docker: per-instance overhead (shim + init)", docker_mem, "MiB", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
