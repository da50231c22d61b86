"""Token expiry and contexts, through the real CLI against a real agent over TLS.

A token's lifetime is kept in the home and an expired one is refused with a detail that
says so; records from before expiry existed never expire. A context names an agent, its
token copied into a private file never printed back; KILN_ADDR beats KILN_CONTEXT, which
beats the current context, which beats the home's socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_harness import _free_port
from test_remote_api import _start, _stop

from kiln.agent.tls import home_ca
from kiln.agent.tokens import TokenStore

KILN = [sys.executable, "-m", "kiln.cli.main"]
Kiln = Callable[..., subprocess.CompletedProcess[str]]


def _private_home(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True)
    return path


def _runner(env: dict[str, str]) -> Kiln:
    def kiln(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KILN, *args], env={**env, **extra}, capture_output=True, text=True, timeout=60
        )

    return kiln


def _one_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], done.stderr


@pytest.fixture
def cli(tmp_path: Path) -> tuple[Path, Path, Kiln]:
    """A client machine: its own home (no agent) and its own config directory."""
    home = _private_home(tmp_path / "client-home")
    config = tmp_path / "config"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_HOME=str(home), XDG_CONFIG_HOME=str(config))
    return home, config / "kiln", _runner(env)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A real agent on TLS: its URL, the CA to trust, tokens by kind."""
    home = _private_home(tmp_path_factory.mktemp("agent") / "home")
    store = TokenStore(home)
    tokens = {"viewer": store.create("viewer")[1], "admin": store.create("admin")[1]}
    tokens["expired"] = store.create("viewer", "short", expires_in=0.3)[1]
    port, process = _start(home)
    try:
        while store.check(tokens["expired"]) is not None:
            time.sleep(0.05)
        yield f"https://127.0.0.1:{port}", home_ca(home), tokens
    finally:
        _stop(home, process)


# Token expiry


def test_token_create_keeps_an_expiry_and_list_shows_it(cli: tuple[Path, Path, Kiln]) -> None:
    home, _, kiln = cli
    made = {}
    for expires in ("12h", None, "never", "2w", "45m"):
        args = ["token", "create", "--role", "viewer", "--json"]
        done = kiln(*args, *(["--expires", expires] if expires else []))
        assert done.returncode == 0, done.stderr
        made[expires] = json.loads(done.stdout)
    now = time.time()
    assert made["12h"]["expires_at"] == pytest.approx(now + 12 * 3600, abs=30)
    assert made[None]["expires_at"] == pytest.approx(now + 90 * 86400, abs=30)  # the default
    assert made["never"]["expires_at"] is None
    assert made["2w"]["expires_at"] == pytest.approx(now + 14 * 86400, abs=30)
    short = TokenStore(home).create("admin", "short", expires_in=0.2)[0]
    time.sleep(0.3)
    listed = {r["id"]: r for r in json.loads(kiln("token", "list", "--json").stdout)}
    assert listed[short.id]["state"] == "expired"
    assert listed[made["never"]["id"]]["state"] == "active"
    text = kiln("token", "list").stdout
    line = next(x for x in text.splitlines() if x.startswith(short.id))
    assert "expired" in line.split()
    assert "never" in next(x for x in text.splitlines() if x.startswith(made["never"]["id"]))
    assert not any(r["token"] in text for r in made.values())


@pytest.mark.parametrize("bad", ["5y", "0d", "3651d", "-1d", "12", "d", "1.5h", "never ever", ""])
def test_token_create_refuses_a_bad_lifetime(cli: tuple[Path, Path, Kiln], bad: str) -> None:
    home, _, kiln = cli
    _one_error(kiln("token", "create", "--role", "admin", "--expires", bad), "--expires")
    assert TokenStore(home).records() == []


def test_a_record_from_before_expiry_never_expires(tmp_path: Path) -> None:
    home = _private_home(tmp_path / "home")
    token = "kiln_" + "Q" * 43
    old = {
        "id": "0123456789ab",
        "name": "old",
        "role": "deployer",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "created": 1.0,
        "revoked": None,
    }
    (home / "tokens.json").write_text(json.dumps({"tokens": [old]}))
    record = TokenStore(home).check(token)
    assert record is not None and record.expires_at is None and record.state() == "active"
    assert TokenStore(home).create("viewer")[0].expires_at is None  # the library default
    assert len(TokenStore(home).records()) == 2  # the old record is kept as it was


def test_an_expired_token_is_refused_with_why(agent: tuple[str, Path, dict[str, str]]) -> None:
    url, ca, tokens = agent
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_ADDR=url, KILN_CA=str(ca), KILN_TOKEN=tokens["expired"])
    done = _runner(env)("status")
    _one_error(done, "expired at", "kiln token create")
    env["KILN_TOKEN"] = tokens["viewer"]
    assert _runner(env)("status").returncode == 0


# Contexts


def _token_file(tmp_path: Path, token: str, name: str = "token") -> Path:
    path = tmp_path / name
    path.write_text(token + "\n")
    return path


def _add(
    kiln: Kiln, name: str, addr: str, token_file: Path, ca: Path | None = None
) -> subprocess.CompletedProcess[str]:
    ca_args = ["--ca", str(ca)] if ca is not None else []
    return kiln("context", "add", name, "--addr", addr, "--token-file", str(token_file), *ca_args)


def test_context_add_use_list_remove(
    cli: tuple[Path, Path, Kiln], agent: tuple[str, Path, dict[str, str]], tmp_path: Path
) -> None:
    _, config, kiln = cli
    url, ca, tokens = agent
    token_file = _token_file(tmp_path, tokens["viewer"])
    added = _add(kiln, "prod", url[len("https://") :], token_file, ca)
    assert added.returncode == 0, added.stderr
    token_file.unlink()  # copied in: the file may go
    assert (config / "contexts.json").stat().st_mode & 0o777 == 0o600
    assert config.stat().st_mode & 0o777 == 0o700
    assert kiln("status").returncode == 1  # not current yet: the home's socket, no agent
    used = kiln("context", "use", "prod")
    assert used.returncode == 0, used.stderr
    status = kiln("status", "--json")
    assert status.returncode == 0, status.stderr
    assert "services" in json.loads(status.stdout)
    listed = kiln("context", "list", "--json")
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["prod"] == {"name": "prod", "addr": url, "ca": str(ca), "current": True}
    assert rows["local"]["current"] is False
    text = kiln("context", "list").stdout
    assert "* prod" in text
    for output in (added.stdout + added.stderr, listed.stdout, text, used.stdout):
        assert tokens["viewer"] not in output
    removed = kiln("context", "remove", "prod")
    assert removed.returncode == 0
    _one_error(kiln("status"), "no agent answers on", "agent.sock")  # back to the socket
    assert json.loads(kiln("context", "list", "--json").stdout) == [
        {"name": "local", "addr": "(this home's socket)", "ca": None, "current": True}
    ]


def test_precedence_env_then_named_then_current_then_socket(
    cli: tuple[Path, Path, Kiln], agent: tuple[str, Path, dict[str, str]], tmp_path: Path
) -> None:
    _, _, kiln = cli
    url, ca, tokens = agent
    dead = f"127.0.0.1:{_free_port()}"
    good = _token_file(tmp_path, tokens["viewer"])
    assert _add(kiln, "prod", url, good, ca).returncode == 0
    assert _add(kiln, "gone", dead, good, ca).returncode == 0
    assert kiln("context", "use", "prod").returncode == 0
    assert kiln("status").returncode == 0  # the current context
    _one_error(kiln("status", KILN_CONTEXT="gone"), f"https://{dead}", "(context gone)")
    assert kiln("status", KILN_CONTEXT="local").returncode == 1  # explicit: the socket
    _one_error(kiln("status", KILN_CONTEXT="nope"), "no context nope")
    _one_error(
        kiln("status", KILN_CONTEXT="prod", KILN_ADDR=f"https://{dead}", KILN_TOKEN="x"),
        "(KILN_ADDR)",
    )
    # KILN_TOKEN overrides the context's token (here with one that is refused).
    _one_error(kiln("status", KILN_TOKEN=tokens["expired"]), "expired at")
    # A context without a CA trusts the system's store, which does not know Kiln's CA.
    assert kiln("context", "add", "noca", "--addr", url, "--token-file", str(good)).returncode == 0
    _one_error(kiln("status", KILN_CONTEXT="noca"), "TLS failed", "the CA of context noca")
    assert kiln("status", KILN_CONTEXT="noca", KILN_CA=str(ca)).returncode == 0


def test_a_context_whose_ca_is_gone_is_one_clear_error(
    cli: tuple[Path, Path, Kiln], agent: tuple[str, Path, dict[str, str]], tmp_path: Path
) -> None:
    _, _, kiln = cli
    url, ca, tokens = agent
    copy = tmp_path / "ca.pem"
    copy.write_bytes(ca.read_bytes())
    token = _token_file(tmp_path, tokens["viewer"])
    assert _add(kiln, "prod", url, token, copy).returncode == 0
    assert kiln("status", KILN_CONTEXT="prod").returncode == 0
    copy.unlink()
    _one_error(kiln("status", KILN_CONTEXT="prod"), "context prod", f"no such CA file {copy}")


def test_hostile_context_input_is_refused_with_one_line(
    cli: tuple[Path, Path, Kiln], tmp_path: Path
) -> None:
    _, config, kiln = cli
    token = _token_file(tmp_path, "kiln_" + "A" * 43)
    ok = ["--addr", "127.0.0.1:7443", "--token-file", str(token)]
    for name in ("../x", "local", "a\nb", "x" * 64, "-", "a/b"):
        done = (
            kiln("context", "add", "--", name, *ok)
            if name == "-"
            else kiln("context", "add", name, *ok)
        )
        assert done.returncode != 0, name
    for addr in ("http://127.0.0.1:1", "127.0.0.1", "h:0", "h:99999", "a/b:1", "u@h:1", ":1"):
        _one_error(kiln("context", "add", "x", "--addr", addr, "--token-file", str(token)), addr)
    huge = tmp_path / "huge"
    huge.write_bytes(b"kiln_" + b"A" * 10_000_000)
    empty = _token_file(tmp_path, "", "empty")
    junk = _token_file(tmp_path, "not a token", "junk")
    for bad in (tmp_path / "missing", empty, junk, huge, tmp_path):
        _one_error(
            kiln("context", "add", "x", "--addr", "h:1", "--token-file", str(bad)), "--token-file"
        )
    _one_error(kiln("context", "add", "x", *ok, "--ca", str(tmp_path / "nope.pem")), "no such CA")
    _one_error(kiln("context", "use", "nope"), "no context nope")
    _one_error(kiln("context", "remove", "../etc"), "no context '../etc'")
    assert kiln("context", "add", "x", *ok).returncode == 0
    _one_error(kiln("context", "add", "x", *ok), "context x exists")
    (config / "contexts.json").write_text("{not json")
    _one_error(kiln("context", "list"), "unreadable context file")
    _one_error(kiln("status"), "unreadable context file")
