"""Deploy benchmark, each figure a median and p95 over several runs:

* rollout time for 3 and 10 replicas, and failed requests under continuous load;
* time to recovery over repeated SIGKILLs of an instance;
* requests dropped while the agent is SIGKILLed and restarted;
* plan time for 100 services x 10 instances (bench/plan.py);
* proxy requests/s and p99 against direct and haproxy (bench/proxy.py);
* the same rolling update and SIGKILL recovery done by Docker Swarm on the
  same image and health interval, when a Docker engine can start here;
* the rollouts, recoveries and agent restarts again with Kiln on the Docker
  runtime (``[runtime] kind = "docker"``) on that same engine.

Run: .venv/bin/python bench/deploy.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    docker,
    median_p95,
    private_dockerd,
    swarm_healthy_tasks,
    swarm_service_create,
)

from kiln.agent.client import AgentClient, start_background
from kiln.observe.load import LoadGenerator

REPO = Path(__file__).resolve().parents[1]
KILN = str(Path(sys.executable).parent / "kiln")
INTERVAL = 1.0

TOML = """\
[project]
name = "bench"
{runtime}
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
health = {{ http = "/healthz", interval = "1s", timeout = "1s" }}
env = {{ GREETING = "{greeting}" }}
stop_grace = "5s"
drain_timeout = "5s"
update = {{ max_surge = 1, max_unavailable = 0, min_healthy_time = "1s" }}
heal = {{ meltdown_fraction = 100.0 }}
"""

HEALTH_CMD = (
    'python3 -c "import os,socket;'
    "s=socket.create_connection(('127.0.0.1',int(os.environ['PORT'])),1);"
    "s.sendall(b'GET /healthz HTTP/1.0\\r\\n\\r\\n');assert b' 200 ' in s.recv(64)\""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kiln(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    out = subprocess.run([KILN, *args], env=env, text=True, capture_output=True)
    if check and out.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def write_project(root: Path, replicas: int, listen: int, greeting: str, runtime: str = "") -> None:
    if not (root / "app").exists():
        shutil.copytree(REPO / "examples" / "shop" / "app", root / "app")
    (root / "kiln.toml").write_text(
        TOML.format(replicas=replicas, listen=listen, greeting=greeting, runtime=runtime)
    )


def runtime_table(host: str) -> str:
    return f'\n[runtime]\nkind = "docker"\nhost = "{host}"\n'


def kill_instance(instance: dict[str, Any], host: str | None) -> None:
    """SIGKILL the app: its sandbox's pid (local), or its container (docker)."""
    if host is not None and instance.get("container"):
        docker(host, "kill", "-s", "KILL", str(instance["container"]))
    else:
        os.kill(int(instance["pid"]), signal.SIGKILL)


def instances(home: Path) -> list[dict[str, Any]]:
    with AgentClient(home) as client:
        return list(client.status()["services"]["web"]["instances"])


def stats(
    label: str, samples: list[float], unit: str = "s", peer: list[float] | None = None
) -> str:
    if not samples:
        return f"{label:<44} (no samples)"
    med, p95 = median_p95(samples)
    scale = 1000.0 if unit == "ms" else 1.0
    text = (
        f"{label:<44} median {med * scale:8.2f} {unit}  p95 {p95 * scale:8.2f} {unit}"
        f"  n={len(samples)}"
    )
    if peer:
        pmed = median_p95(peer)[0]
        text += f"  swarm {pmed * scale:8.2f} {unit}  kiln/swarm {med / pmed:.2f}"
    return text


def kiln_rollouts(
    work: Path, replicas: int, runs: int, runtime: str = "", tag: str = ""
) -> tuple[list[float], list[int], int]:
    home = work / f"home-{replicas}{tag}"
    project, listen = work / f"p{replicas}{tag}", free_port()
    project.mkdir()
    write_project(project, replicas, listen, "v0", runtime)
    kiln(home, "up", str(project))
    durations, failures, sent = [], [], 0
    try:
        for run in range(1, runs + 1):
            write_project(project, replicas, listen, f"v{run}", runtime)
            with LoadGenerator("127.0.0.1", listen, workers=4) as load:
                time.sleep(0.5)
                start = time.perf_counter()
                kiln(home, "apply", "--file", str(project), "--yes")
                durations.append(time.perf_counter() - start)
                time.sleep(0.5)
            failures.append(load.report.failed)
            sent += load.report.sent
            print(
                f"  kiln{tag} rollout {replicas} replicas run {run}: {durations[-1]:.1f} s, "
                f"{load.report.summary()}",
                flush=True,
            )
    finally:
        if replicas != 3:
            kiln(home, "down", check=False)
    return durations, failures, sent


def kiln_recoveries(home: Path, kills: int, host: str | None = None) -> list[float]:
    out = []
    for n in range(kills):
        while True:
            ready = [i for i in instances(home) if i["state"] == "ready"]
            old = [i for i in ready if i["age"] > 12]
            if len(ready) >= 3 and old:
                break
            time.sleep(0.5)
        victim = max(old, key=lambda i: i["age"])
        start = time.monotonic()
        kill_instance(victim, host)
        while True:
            ready = [i for i in instances(home) if i["state"] == "ready"]
            if len(ready) >= 3 and victim["id"] not in {i["id"] for i in ready}:
                out.append(time.monotonic() - start)
                break
            if time.monotonic() - start > 60:
                raise SystemExit(f"kiln: instance {victim['id']} not replaced within 60 s")
            time.sleep(0.05)
        print(f"  kiln SIGKILL {n + 1}: replaced in {out[-1]:.2f} s", flush=True)
    return out


def kiln_agent_restarts(home: Path, listen: int, runs: int) -> tuple[list[int], int]:
    dropped, sent = [], 0
    for run in range(runs):
        before = {i["id"] for i in instances(home)}
        with LoadGenerator("127.0.0.1", listen, workers=4) as load:
            time.sleep(0.5)
            with AgentClient(home) as client:
                pid = int(client.health()["pid"])
            os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)
            start_background(home)
            time.sleep(1.5)
        after = {i["id"] for i in instances(home)}
        dropped.append(load.report.failed)
        sent += load.report.sent
        print(
            f"  agent SIGKILL {run + 1}: {load.report.summary()}; "
            f"instances kept: {before == after}",
            flush=True,
        )
    return dropped, sent


def kiln_proxy_restarts(home: Path, listen: int, runs: int) -> tuple[list[int], list[float], int]:
    """SIGKILL the data plane under load: what is lost until the agent restarts it."""
    lost, gaps, sent = [], [], 0
    for run in range(runs):
        with AgentClient(home) as client:
            pid = int(client.health()["proxy_pid"])
        with LoadGenerator("127.0.0.1", listen, workers=4) as load:
            time.sleep(0.5)
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while True:
                with AgentClient(home) as client:
                    health = client.health()
                if health.get("proxy_pid") not in (None, pid):
                    break
                time.sleep(0.02)
            before = load.report.failed
            while True:
                time.sleep(0.05)
                if load.report.failed == before or time.monotonic() - killed > 10:
                    break
                before = load.report.failed
            gaps.append(time.monotonic() - killed)
            time.sleep(1.0)
        lost.append(load.report.failed)
        sent += load.report.sent
        print(
            f"  proxy SIGKILL {run + 1}: {load.report.summary()}; serving again after "
            f"{gaps[-1]:.2f} s",
            flush=True,
        )
    return lost, gaps, sent


def swarm(host: str, archive: Path, replicas: int, runs: int, kills: int) -> dict[str, Any]:
    name = f"web{replicas}"
    swarm_service_create(
        lambda *argv: docker(host, *argv).stdout,
        name,
        "shop-web:bench",
        replicas,
        health_cmd=HEALTH_CMD,
        interval=INTERVAL,
        timeout=1.0,
        retries=3,
        parallelism=1,
        monitor=1.0,
        stop_grace=5.0,
        env={"PORT": f"2{replicas:02d}{{{{.Task.Slot}}}}", "GREETING": "v0"},
        extra=("--network", "host"),
        detach=False,
    )
    port = int(f"2{replicas:02d}1")
    durations, failures = [], []
    for run in range(1, runs + 1):
        with LoadGenerator("127.0.0.1", port, workers=2) as load:
            time.sleep(0.5)
            start = time.perf_counter()
            docker(
                host, "service", "update", "--detach=false", "--env-add", f"GREETING=v{run}", name
            )
            durations.append(time.perf_counter() - start)
            time.sleep(0.5)
        failures.append(load.report.failed)
        print(
            f"  swarm rollout {replicas} replicas run {run}: {durations[-1]:.1f} s; host port "
            f"{port} (slot 1 only): {load.report.summary()}",
            flush=True,
        )
    recoveries = []
    for n in range(kills):
        ids = swarm_healthy_tasks(lambda *argv: docker(host, *argv).stdout, name)
        victim = ids[0]
        pid = int(docker(host, "inspect", "-f", "{{.State.Pid}}", victim).stdout)
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while True:
            healthy = swarm_healthy_tasks(lambda *argv: docker(host, *argv).stdout, name)
            if len(healthy) >= replicas and victim not in healthy:
                recoveries.append(time.monotonic() - start)
                break
            if time.monotonic() - start > 90:
                raise SystemExit("swarm: task not replaced within 90 s")
            time.sleep(0.05)
        print(f"  swarm SIGKILL {n + 1}: replaced in {recoveries[-1]:.2f} s", flush=True)
    docker(host, "service", "rm", name, check=False)
    return {"durations": durations, "failures": failures, "recoveries": recoveries}


def kiln_suite(
    work: Path, runs: int, kills: int, runtime: str = "", tag: str = "", host: str | None = None
) -> dict[str, Any]:
    """Rollouts of 3 and 10 replicas, SIGKILL recoveries and agent restarts on one runtime."""
    print(f"kiln{tag}: rolling updates under load", flush=True)
    r3, f3, s3 = kiln_rollouts(work, 3, runs, runtime, tag)
    r10, f10, s10 = kiln_rollouts(work, 10, runs, runtime, tag)
    home3 = work / f"home-3{tag}"
    print(f"kiln{tag}: SIGKILL recoveries (3 replicas, health interval 1 s)", flush=True)
    ttr = kiln_recoveries(home3, kills, host)
    print(f"kiln{tag}: agent SIGKILL + restart under load", flush=True)
    listen3 = json.loads(kiln(home3, "status", "--json").stdout)["services"]["web"]["listen"]
    dropped, sent_agent = kiln_agent_restarts(home3, int(listen3), runs)
    return {
        "home": home3,
        "listen": int(listen3),
        "r3": r3,
        "r10": r10,
        "failed": f3 + f10,
        "sent": s3 + s10,
        "ttr": ttr,
        "dropped": dropped,
        "sent_agent": sent_agent,
    }


def suite_lines(name: str, kiln_figures: dict[str, Any], sw3: Any, sw10: Any) -> list[str]:
    k = kiln_figures
    return [
        stats(f"rollout, 3 replicas ({name})", k["r3"], peer=sw3.get("durations")),
        stats(f"rollout, 10 replicas ({name})", k["r10"], peer=sw10.get("durations")),
        f"{'failed requests during rollouts (' + name + ')':<44} {sum(k['failed'])} of "
        f"{k['sent']} (per run: {k['failed']})",
        stats(f"time to recovery after SIGKILL ({name})", k["ttr"], peer=sw3.get("recoveries")),
        f"{'requests dropped, agent SIGKILL (' + name + ')':<44} {sum(k['dropped'])} of "
        f"{k['sent_agent']} (per run: {k['dropped']})",
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    args = parser.parse_args()
    runs, kills = (2, 5) if args.quick else (3, 20)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-deploy-"))
    lines: list[str] = []
    try:
        local = kiln_suite(work, runs, kills)
        home3, listen3 = local["home"], local["listen"]
        print("kiln: proxy SIGKILL under load (the agent restarts it)", flush=True)
        proxy_lost, proxy_gaps, sent_proxy = kiln_proxy_restarts(home3, listen3, runs)

        sw3: dict[str, Any] = {}
        sw10: dict[str, Any] = {}
        on_docker: dict[str, Any] | None = None
        with private_dockerd() as host:
            if host is None:
                print("swarm: no Docker engine could start here; no peer figures", flush=True)
            else:
                print("kiln on the docker runtime, same engine as swarm", flush=True)
                on_docker = kiln_suite(
                    work, runs, min(kills, 10), runtime_table(host), "-docker", host
                )
                kiln(on_docker["home"], "down", check=False)
                for home in work.glob("home-*-docker"):
                    kiln(home, "down", check=False)
                archive = work / "shop.tar"
                kiln(home3, "image", "export", "web", "--format", "docker", "-o", str(archive))
                loaded = docker(host, "load", "-i", str(archive)).stdout
                ref = loaded.strip().split()[-1]
                docker(host, "tag", ref, "shop-web:bench")
                docker(host, "swarm", "init", "--advertise-addr", "127.0.0.1")
                print("swarm: the same updates and kills", flush=True)
                sw3 = swarm(host, archive, 3, runs, min(kills, 5 if args.quick else 10))
                sw10 = swarm(host, archive, 10, runs, 0)
        kiln(home3, "down", check=False)

        lines += [
            "",
            "kiln deploy benchmark (examples/shop image, health interval 1 s, surge 1, "
            "swarm --update-monitor 1 s = min_healthy_time)",
            *suite_lines("local", local, sw3, sw10),
        ]
        if on_docker is not None:
            lines += suite_lines("docker", on_docker, sw3, sw10)
        if sw3:
            lines.append(
                f"{'failed requests during rollouts (swarm, host port of slot 1)':<44} "
                f"{sum(sw3['failures']) + sum(sw10['failures'])} (per run: "
                f"{sw3['failures'] + sw10['failures']}); swarm's routing mesh needs IPVS, "
                "absent here"
            )
        lines += [
            f"{'requests lost, proxy SIGKILL + restart':<44} {sum(proxy_lost)} of {sent_proxy} "
            f"(per run: {proxy_lost})",
            stats("proxy SIGKILL until serving again", proxy_gaps),
        ]
        print("\n".join(lines), flush=True)
    finally:
        for home in work.glob("home-*"):
            kiln(home, "down", check=False)
        shutil.rmtree(work, ignore_errors=True)
    print("\nplan time (bench/plan.py):", flush=True)
    subprocess.run([sys.executable, str(REPO / "bench" / "plan.py")], check=False)
    print("\nproxy throughput (bench/proxy.py):", flush=True)
    subprocess.run([sys.executable, str(REPO / "bench" / "proxy.py")], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
