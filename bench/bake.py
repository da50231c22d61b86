"""Bake benchmark: cold bake, cached re-bake and `kiln --version` of the example,
each a median over several runs; `docker build` of the equivalent Dockerfile,
cold and cached, in the same run when a Docker engine can start here.

Run: .venv/bin/python bench/bake.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import docker, median_p95, private_dockerd, timed

REPO = Path(__file__).resolve().parents[1]
KILN = str(Path(sys.executable).parent / "kiln")

DOCKERFILE = """\
FROM debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3-minimal \\
 && rm -rf /var/lib/apt/lists/*
COPY app/ /srv/app
RUN python3 -m compileall -q /srv/app
ENV PYTHONUNBUFFERED=1
USER 65534:65534
WORKDIR /srv/app
CMD ["python3", "server.py"]
"""

BASE_TOML = """\
[project]
name = "bench-base"

[images.debian]
from = "debian:bookworm"
"""


def kiln(home: Path, *args: str) -> str:
    env = dict(os.environ, KILN_HOME=str(home))
    out = subprocess.run([KILN, *args], env=env, text=True, capture_output=True)
    if out.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout.strip()


def row(label: str, samples: list[float], peer: list[float] | None = None) -> None:
    med, p95 = median_p95(samples)
    text = (
        f"{label:<34} median {med * 1000:9.1f} ms   p95 {p95 * 1000:9.1f} ms   (n={len(samples)})"
    )
    if peer:
        text += f"   ratio kiln/docker {med / median_p95(peer)[0]:.2f}"
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="cold runs (cached: 4x)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-bake-"))
    try:
        project = work / "shop"
        shutil.copytree(REPO / "examples" / "shop", project)
        warm = work / "home-warm"
        print(f"example: {project}", flush=True)
        digest = kiln(warm, "bake", str(project))  # writes kiln.lock, warms the .deb cache
        print(f"baked {digest}", flush=True)

        homes = iter(range(1000))
        cold = timed(
            lambda: kiln(work / f"home-cold-{next(homes)}", "bake", str(project)), args.runs
        )
        cached = timed(lambda: kiln(warm, "bake", str(project)), args.runs * 4)
        version = timed(lambda: subprocess.run([KILN, "--version"], capture_output=True), 20)
        server = project / "app" / "server.py"
        edits = iter(range(10_000))

        def edit_app() -> None:
            with server.open("a") as f:
                f.write(f"# edit {next(edits)}\n")

        def kiln_after_edit() -> None:
            edit_app()
            kiln(warm, "bake", str(project))

        app_edit = timed(kiln_after_edit, args.runs * 2)

        docker_cold: list[float] | None = None
        docker_cached: list[float] | None = None
        docker_edit: list[float] | None = None
        with private_dockerd() as host:
            if host is None:
                print("docker: no engine could start here; no peer figures", flush=True)
            else:
                base_dir = work / "base"
                base_dir.mkdir()
                (base_dir / "kiln.toml").write_text(BASE_TOML)
                kiln(warm, "bake", str(base_dir))
                archive = work / "debian.tar"
                kiln(warm, "image", "export", "debian", "--format", "docker", "-o", str(archive))
                docker(host, "load", "-i", str(archive))
                docker(
                    host, "tag", docker(host, "images", "-q").stdout.split()[0], "debian:bookworm"
                )
                (project / "Dockerfile").write_text(DOCKERFILE)
                build = ["build", "--network=host", "-q", "-t", "shop-web", str(project)]
                docker(host, *build)  # warm apt on the host side as kiln's .deb cache is warm
                docker_cold = timed(
                    lambda: docker(host, *build[:1], "--no-cache", *build[1:]), args.runs
                )
                docker_cached = timed(lambda: docker(host, *build), args.runs * 4)

                def docker_after_edit() -> None:
                    edit_app()
                    docker(host, *build)

                docker_edit = timed(docker_after_edit, args.runs * 2)

        print("\nkiln bake of examples/shop (debian:bookworm + python3-minimal + app)")
        row("cold bake (fresh KILN_HOME)", cold, docker_cold)
        row("cached re-bake (unchanged tree)", cached, docker_cached)
        row("re-bake after an app edit", app_edit, docker_edit)
        row("kiln --version", version)
        if docker_cold and docker_cached:
            row("docker build --no-cache", docker_cold)
            row("docker build (cached)", docker_cached)
            row("docker build after an app edit", docker_edit or [])
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
