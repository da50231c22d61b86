"""``kiln init`` through the real CLI: every template is a valid project as written,
nothing a newcomer wrote is overwritten unasked, mistakes are one line, and the
project name is made valid. (The bakes and requests: tests/e2e/test_init_up.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.spec.loader import parse_spec
from kiln.spec.templates import DEFAULT_TEMPLATE, TEMPLATES, project_name, template_files

KILN = str(Path(sys.executable).parent / "kiln")


def kiln(*args: str, home: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KILN_HOME=str(home))
    return subprocess.run(
        [KILN, *args], env=env, cwd=cwd, text=True, capture_output=True, timeout=60
    )


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_every_template_passes_kiln_validate(template: str, tmp_path: Path) -> None:
    project = tmp_path / "new" / "Demo App"
    made = kiln("init", str(project), "--template", template, home=tmp_path / "home")
    assert made.returncode == 0, made.stderr
    assert made.stderr == ""
    written = template_files(template, "demo-app")
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()) == (
        sorted(written)
    )
    for path, data in written.items():
        assert (project / path).read_bytes() == data
    toml = (project / "kiln.toml").read_text()
    assert 'name = "demo-app"' in toml
    # The comments stay in their column after the name changed length.
    assert toml.index("# lowercase") == toml.index("# lowercase", toml.index('name = "demo-app"'))
    lines = made.stdout.splitlines()
    assert lines[0] == f"wrote the {template} template as project demo-app in {project}:"
    assert [line.strip() for line in lines[1 : 1 + len(written)]] == list(written)
    assert f"  cd '{project}'" in lines and any(line.startswith("  kiln up ") for line in lines)

    valid = kiln("validate", str(project), home=tmp_path / "home")
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.strip() == "kiln.toml is valid"


def test_the_templates_can_run_side_by_side_in_one_home() -> None:
    """Distinct service names and listen ports: a newcomer may try all three at once."""
    specs = [
        parse_spec(template_files(name)["kiln.toml"].decode(), Path("kiln.toml"))
        for name in TEMPLATES
    ]
    services = [name for spec in specs for name in spec.services]
    listens = [s.listen for spec in specs for s in spec.services.values()]
    assert len(set(services)) == len(services) == len(TEMPLATES)
    assert None not in listens and len(set(listens)) == len(listens)
    for spec in specs:
        recipe = next(iter(spec.images.values()))
        assert recipe.user == "65534:65534", "templates never run their app as root"
        assert "python3-minimal" not in recipe.packages  # it has no http.server


def test_default_is_the_python_template_in_the_current_directory(tmp_path: Path) -> None:
    project = tmp_path / "Café Shop!"
    project.mkdir()
    made = kiln("init", home=tmp_path / "home", cwd=project)
    assert made.returncode == 0, made.stderr
    assert (project / "app" / "server.py").is_file()
    assert 'name = "cafe-shop"' in (project / "kiln.toml").read_text()
    assert made.stdout.splitlines()[0] == "wrote the python template as project cafe-shop:"
    assert "  cd " not in made.stdout  # already there
    assert "  curl http://127.0.0.1:8000/" in made.stdout.splitlines()


def test_refuses_to_overwrite_and_force_does(tmp_path: Path) -> None:
    home = tmp_path / "home"
    project = tmp_path / "p"
    assert kiln("init", str(project), home=home).returncode == 0
    toml = project / "kiln.toml"
    toml.write_text("# mine\n")
    (project / "notes.txt").write_text("keep\n")

    again = kiln("init", str(project), "--template", "static", home=home)
    assert again.returncode == 1
    assert again.stderr == (
        f"error: {toml}: already exists; kiln init wrote nothing (--force overwrites it)\n"
    )
    assert toml.read_text() == "# mine\n"
    assert not (project / "site").exists()

    (project / "site").mkdir()
    (project / "site" / "index.html").write_text("<p>mine</p>\n")
    both = kiln("init", str(project), "--template", "static", home=home)
    assert both.returncode == 1
    assert both.stderr == (
        f"error: {project}: kiln.toml, site/index.html already exist; kiln init wrote "
        "nothing (--force overwrites them)\n"
    )

    # A symlink is replaced, never written through.
    outside = tmp_path / "outside.toml"
    outside.write_text("# elsewhere\n")
    toml.unlink()
    toml.symlink_to(outside)
    forced = kiln("init", str(project), "--template", "static", "--force", home=home)
    assert forced.returncode == 0, forced.stderr
    assert outside.read_text() == "# elsewhere\n"
    assert not toml.is_symlink() and "[services.site]" in toml.read_text()
    assert (project / "site" / "index.html").read_bytes() == template_files("static")[
        "site/index.html"
    ]
    assert (project / "notes.txt").read_text() == "keep\n"
    assert (project / "app" / "server.py").is_file()  # not the template's: left alone
    assert sorted(p.name for p in project.iterdir()) == ["app", "kiln.toml", "notes.txt", "site"]


def test_a_bad_template_or_name_is_one_error_line_and_writes_nothing(tmp_path: Path) -> None:
    project = tmp_path / "p"
    bad = kiln("init", str(project), "--template", "nginx", home=tmp_path / "home")
    assert bad.returncode == 1
    assert bad.stderr == (
        "error: --template: 'nginx' is not a template; choose one of python, static, redis\n"
    )
    bad_name = kiln("init", str(project), "--name", "My App", home=tmp_path / "home")
    assert bad_name.returncode == 1
    assert bad_name.stderr == (
        "error: --name: 'My App' is not a project name (lowercase letters, digits, '.', '_', "
        "'-', starting with a letter or digit, at most 63); try 'my-app'\n"
    )
    assert not project.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    not_dir = kiln("init", str(a_file), home=tmp_path / "home")
    assert not_dir.returncode == 1
    assert not_dir.stderr == f"error: {a_file}: exists and is not a directory\n"


def test_an_explicit_name_is_used_as_given(tmp_path: Path) -> None:
    made = kiln("init", str(tmp_path / "x"), "--name", "shop.v2", "-t", "redis", home=tmp_path)
    assert made.returncode == 0, made.stderr
    assert 'name = "shop.v2"' in (tmp_path / "x" / "kiln.toml").read_text()
    assert "  redis-cli -p 6379 ping" in made.stdout.splitlines()


@pytest.mark.parametrize(
    ("directory", "name"),
    [
        ("shop", "shop"),
        ("My Shop!", "my-shop"),
        ("Café", "cafe"),
        ("__init__", "init"),
        ("a  b--c", "a-b-c"),
        ("-.-", "app"),
        ("日本", "app"),
        ("x" * 80, "x" * 63),
        ("a" * 62 + "-b", "a" * 62),
        ("v1.2_rc", "v1.2_rc"),
    ],
)
def test_project_names_from_directory_names(directory: str, name: str) -> None:
    assert project_name(directory) == name


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_every_directory_name_gives_a_name_the_loader_accepts(directory: str) -> None:
    name = project_name(directory)
    text = template_files("redis", name)["kiln.toml"].decode()
    assert parse_spec(text, Path("kiln.toml")).project.name == name


def test_the_python_app_serves_on_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The template's app itself, on the host's Python: /, /healthz, a 404, $PORT, SIGTERM."""
    app = tmp_path / "server.py"
    app.write_bytes(template_files("python")["app/server.py"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(app)],
        env=dict(os.environ, PORT=str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"listening on port {port}\n"
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
            assert (resp.status, resp.read()) == (200, b"ok\n")
        with urllib.request.urlopen(f"{base}/", timeout=5) as resp:
            assert resp.read().decode().startswith("Hello from Kiln (")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/nope", timeout=5)
        assert missing.value.code == 404
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert time.monotonic() - started < 5
    assert '"GET / HTTP/1.1" 200' in out and "/healthz" not in out  # probes stay out of logs
    assert out.endswith("stopped\n")


def test_help_describes_every_template_without_loading_the_spec_models(tmp_path: Path) -> None:
    shown = kiln("init", "--help", home=tmp_path)
    assert shown.returncode == 0
    text = " ".join(shown.stdout.replace("│", " ").split())
    assert DEFAULT_TEMPLATE == "python" and "python (the default):" in text
    for name in TEMPLATES[1:]:
        assert f"; {name}: " in text, text
    assert "<bool>" not in shown.stdout.split("--force")[1].splitlines()[0]
    code = (
        "import sys; from kiln.cli.main import main; main(['init', '--help']); "
        "print(sorted(m for m in sys.modules if m.startswith('kiln.spec')), file=sys.stderr)"
    )
    env = dict(os.environ, KILN_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stderr.splitlines()[-1] == "[]", "every command's help would pay for pydantic"
