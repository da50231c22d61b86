"""The run-step sandbox: the bwrap command as data, then real runs over a busybox rootfs."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest_bake import BUSYBOX, needs_busybox

from kiln.image.sandbox import (
    BUILD_CAPABILITIES,
    DEFAULT_PATH,
    bwrap_argv,
    run_in_sandbox,
    sandbox_env,
    step_command,
    terminal_line,
)

pytestmark = needs_busybox


def _caps() -> list[str]:
    out: list[str] = []
    for cap in BUILD_CAPABILITIES:
        out += ["--cap-add", cap]
    return out


def test_bwrap_argv_without_network() -> None:
    argv = bwrap_argv(
        "/usr/bin/bwrap", Path("/r"), ["/bin/sh", "-c", "true"], {"B": "2"}, "/w", False
    )
    assert argv == [
        "/usr/bin/bwrap",
        "--bind", "/r", "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--unshare-all",
        "--hostname", "kiln",
        "--die-with-parent",
        "--cap-drop", "ALL",
        *_caps(),
        "--clearenv",
        "--setenv", "B", "2",
        "--chdir", "/w",
        "--", "/bin/sh", "-c", "true",
    ]  # fmt: skip


def test_bwrap_argv_with_network_shares_net_and_resolv_conf_only() -> None:
    argv = bwrap_argv("bwrap", Path("/r"), ["x"], {}, "/", True)
    at = argv.index("--unshare-all")
    assert argv[at + 1 : at + 5] == [
        "--share-net",
        "--ro-bind",
        "/etc/resolv.conf",
        "/etc/resolv.conf",
    ]
    assert argv.count("--ro-bind") == 1


def test_step_command_string_is_shell_list_is_exec() -> None:
    assert step_command("echo hi") == ["/bin/sh", "-c", "echo hi"]
    assert step_command(["/bin/echo", "hi"]) == ["/bin/echo", "hi"]


def test_sandbox_env_defaults_path_and_lets_image_override() -> None:
    assert sandbox_env({})["PATH"] == DEFAULT_PATH
    assert sandbox_env({"PATH": "/opt/bin", "X": "1"}) == {
        "PATH": "/opt/bin",
        "HOME": "/root",
        "X": "1",
    }


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    return root


def _run(rootfs: Path, script: str, network: bool = False, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    lines: list[str] = []
    result = run_in_sandbox(
        rootfs, step_command(script), sandbox_env(env or {}), "/", network, lines.append
    )
    return result, lines


def test_run_writes_into_rootfs_as_root_with_umask_022(rootfs: Path) -> None:
    result, lines = _run(rootfs, "busybox id -u; echo made > /made.txt; busybox mkdir /d")
    assert result.exit_code == 0
    assert lines == ["0"]
    assert (rootfs / "made.txt").read_text() == "made\n"
    assert stat.S_IMODE((rootfs / "made.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((rootfs / "d").stat().st_mode) == 0o755


def test_mount_points_bwrap_needed_do_not_stay_in_the_rootfs(rootfs: Path) -> None:
    result, _ = _run(rootfs, "echo x > /tmp/scratch", network=True)
    assert result.exit_code == 0
    assert sorted(p.name for p in rootfs.iterdir()) == ["bin"]


def test_environment_is_cleared_to_the_image_env(rootfs: Path) -> None:
    os.environ["KILN_TEST_LEAK"] = "secret"
    try:
        result, lines = _run(rootfs, "busybox env | busybox sort", env={"APP": "1"})
    finally:
        del os.environ["KILN_TEST_LEAK"]
    assert result.exit_code == 0
    assert lines == ["APP=1", "HOME=/root", f"PATH={DEFAULT_PATH}", "PWD=/", "SHLVL=1"]


def test_network_is_off_by_default_only_loopback(rootfs: Path) -> None:
    result, lines = _run(rootfs, "busybox ip -o link | busybox cut -d: -f2")
    assert result.exit_code == 0
    assert [line.strip() for line in lines] == ["lo"]


def test_failure_keeps_exit_code_and_last_20_lines(rootfs: Path) -> None:
    result, lines = _run(rootfs, "for i in $(busybox seq 1 30); do echo line $i; done; exit 3")
    assert result.exit_code == 3
    assert len(lines) == 30
    assert result.tail == tuple(f"line {i}" for i in range(11, 31))


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"plain line\n", "plain line"),
        (b"windows line\r\n", "windows line"),
        (b"(Reading database ... 5%\r(Reading database ... 100%\rdone.\n", "done."),
        (b"bad \xff byte\n", "bad \ufffd byte"),
    ],
)
def test_output_lines_are_what_a_terminal_would_show(raw: bytes, shown: str) -> None:
    assert terminal_line(raw) == shown
