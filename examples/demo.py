"""`make demo`: the story of VISION.md, told by running the real commands.

1. bake the example twice, in different directories and homes: same digest;
2. kiln up: three instances behind the proxy on :8000;
3. change the app, kiln plan, kiln apply under continuous load: 0 failures;
4. SIGKILL an instance: the reconciler replaces it (time to recovery);
5. kiln rollback web; 6. the logs of an instance that no longer exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kiln.observe.load import LoadGenerator

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "shop"
KILN = str(Path(sys.executable).parent / "kiln")
WORK = Path(os.environ.get("KILN_DEMO_DIR", "/tmp/kiln-demo"))
HOME = WORK / "home"


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def kiln(
    *args: str,
    home: Path = HOME,
    cwd: Path | None = None,
    check: bool = True,
    capture: bool = False,
    ok: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess[str]:
    print(f"$ kiln {' '.join(args)}", flush=True)
    env = dict(os.environ, KILN_HOME=str(home))
    proc = subprocess.run([KILN, *args], cwd=cwd, env=env, text=True, capture_output=capture)
    if capture:
        sys.stdout.write(proc.stdout)
        failed = proc.returncode not in ok
        # a step's own output (mmdebstrap, apt) matters only when something failed
        shown = [line for line in proc.stderr.splitlines() if failed or " | " not in line]
        sys.stderr.write("".join(f"{line}\n" for line in shown))
    if check and proc.returncode not in ok:
        raise SystemExit(f"demo: kiln {' '.join(args)} exited {proc.returncode}")
    return proc


def status(home: Path = HOME) -> dict:
    env = dict(os.environ, KILN_HOME=str(home))
    out = subprocess.run(
        [KILN, "status", "--json"], env=env, text=True, capture_output=True, check=True
    )
    return json.loads(out.stdout)


def instances(data: dict, service: str = "web") -> list[dict]:
    services = data["services"]
    svc = (
        services[service]
        if isinstance(services, dict)
        else next(s for s in services if s["name"] == service)
    )
    return list(svc["instances"])


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode().strip()


def version_of(body: str) -> str:
    return body.rsplit("(", 1)[-1].strip().rstrip(")")


def fresh_copy(dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def main() -> int:
    if HOME.exists():
        subprocess.run(
            [KILN, "down"], env=dict(os.environ, KILN_HOME=str(HOME)), capture_output=True
        )
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    project = fresh_copy(WORK / "shop")

    banner("1. Bake the example (debian:bookworm + python3-minimal + the app)")
    first = kiln("bake", str(project), capture=True).stdout.strip()
    banner("   …and again, in another directory, another KILN_HOME, another umask")
    other_home = Path(tempfile.mkdtemp(prefix="kiln-demo-home-"))
    other = fresh_copy(WORK / "elsewhere" / "shop")
    shutil.copy(project / "kiln.lock", other / "kiln.lock")
    old_umask = os.umask(0o077)
    try:
        second = kiln("bake", str(other), home=other_home, capture=True).stdout.strip()
    finally:
        os.umask(old_umask)
        shutil.rmtree(other_home, ignore_errors=True)
    print(f"first : {first}\nsecond: {second}")
    print("same digest, bit for bit" if first == second else "DIGESTS DIFFER")
    if first != second:
        return 1
    start = time.perf_counter()
    kiln("bake", str(project), capture=True)
    print(f"cached re-bake: {time.perf_counter() - start:.2f} s (including process start)")

    banner("2. kiln up: bake, start the agent, plan, apply")
    kiln("up", str(project))
    kiln("status", ok=(0, 3))
    print("curl http://127.0.0.1:8000/ →", fetch("http://127.0.0.1:8000/"))

    banner("3. Change the app, plan, and roll it out under continuous load")
    server = project / "app" / "server.py"
    server.write_text(server.read_text().replace('VERSION = "1"', 'VERSION = "2"'))
    kiln("plan", str(project), ok=(2,))
    with LoadGenerator("127.0.0.1", 8000, workers=4, classify=version_of) as load:
        time.sleep(1)
        kiln("apply", "--file", str(project), "--yes")
        time.sleep(1)
    report = load.report
    print(f"load during the rollout: {report.summary()}")
    print("answers seen:", ", ".join(f"{k!r}×{v}" for k, v in sorted(report.bodies.items())))
    print("curl http://127.0.0.1:8000/ →", fetch("http://127.0.0.1:8000/"))

    banner("4. kill -9 one instance: the reconciler replaces it")
    victim = next(i for i in instances(status()) if i.get("state") == "ready")
    print(f"$ kill -9 {victim['pid']}   # instance {victim['id']}")
    killed_at = time.time()
    os.kill(int(victim["pid"]), 9)
    recovered = None
    with LoadGenerator("127.0.0.1", 8000, workers=2) as load:
        deadline = time.time() + 60
        while time.time() < deadline:
            live = [i for i in instances(status()) if i.get("state") == "ready"]
            if len(live) >= 3 and victim["id"] not in {i["id"] for i in live}:
                recovered = time.time() - killed_at
                break
            time.sleep(0.2)
    print(
        f"replaced in {recovered:.1f} s (health interval 1 s); "
        f"requests meanwhile: {load.report.summary()}"
        if recovered
        else "NOT REPLACED"
    )
    kiln("events", capture=True)

    banner("5. kiln rollback web: new instances from the previous revision")
    kiln("history", "web")
    kiln("rollback", "web")
    print("curl http://127.0.0.1:8000/ →", fetch("http://127.0.0.1:8000/"))
    kiln("status", ok=(0, 3))

    banner("6. Logs of an instance that no longer exists")
    print(f"$ kiln logs web --instance {victim['id']}   # first and last lines")
    lines = subprocess.run(
        [KILN, "logs", "web", "--instance", victim["id"]],
        env=dict(os.environ, KILN_HOME=str(HOME)),
        text=True,
        capture_output=True,
        check=True,
    ).stdout.splitlines()
    shown = lines if len(lines) <= 8 else [*lines[:3], f"… {len(lines) - 6} more …", *lines[-3:]]
    print("\n".join(shown))

    banner("Still running")
    print(
        f"The agent, HAProxy on :8000 and {len(instances(status()))} instances (KILN_HOME={HOME})."
    )
    print(f"Stop everything with:  KILN_HOME={HOME} {KILN} down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
