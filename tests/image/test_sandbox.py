"""The run-step sandbox: real runc runs in the home's id range over a shifted busybox tree."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from busybox_tree import build_busybox_rootfs
from kiln.errors import KilnError
from kiln.image.sandbox import (
    DEFAULT_PATH,
    STEPS_NEED,
    SandboxResult,
    run_in_sandbox,
    sandbox_env,
    step_blocker,
    step_command,
    terminal_line,
)
from kiln.image.snapshots import shift_tree
from kiln.oci.idmap import IdRange, id_range
from kiln.oci.network import BridgeNetwork

needs_steps = pytest.mark.skipif(step_blocker() is not None, reason=str(step_blocker()))


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


@pytest.fixture
def ids(kiln_home: Path) -> Iterator[IdRange]:
    """The home's range; its bridge (made by a step with the network) goes afterwards."""
    yield id_range(kiln_home)
    BridgeNetwork(kiln_home).remove()


def _shift(tree: Path, ids: IdRange) -> None:
    """Owners into the range, as the layer unpacker leaves a snapshot."""
    shift_tree(tree, ids, str(tree))


@pytest.fixture
def rootfs(tmp_path: Path, ids: IdRange) -> Path:
    """Busybox without /proc, /dev, /tmp or /sys: runc has to make its mount points."""
    root = build_busybox_rootfs(tmp_path / "rootfs", mount_points=())
    (root / "srv").mkdir()
    _shift(root, ids)
    return root


def _run(
    rootfs: Path,
    ids: IdRange | None,
    script: str,
    *,
    network: bool = False,
    env: dict[str, str] | None = None,
    workdir: str = "/",
) -> tuple[SandboxResult, list[str]]:
    lines: list[str] = []
    result = run_in_sandbox(
        rootfs,
        step_command(script),
        sandbox_env(env or {}),
        workdir,
        network,
        lines.append,
        ids=ids,
    )
    return result, lines


@needs_steps
def test_stdout_and_stderr_come_as_one_stream_in_order(rootfs: Path, ids: IdRange) -> None:
    result, lines = _run(rootfs, ids, "echo 1; echo 2 >&2; echo 3; echo 4 >&2; echo 5")
    assert (result.exit_code, lines) == (0, ["1", "2", "3", "4", "5"])


@needs_steps
def test_failure_keeps_exit_code_and_last_20_lines(rootfs: Path, ids: IdRange) -> None:
    result, lines = _run(rootfs, ids, "for i in $(seq 1 30); do echo line $i; done; exit 3")
    assert result.exit_code == 3
    assert len(lines) == 30
    assert result.tail == tuple(f"line {i}" for i in range(11, 31))


@needs_steps
@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_the_exit_code_is_the_steps(rootfs: Path, ids: IdRange, code: int) -> None:
    assert _run(rootfs, ids, f"exit {code}")[0].exit_code == code


@needs_steps
def test_a_command_that_cannot_start_fails_the_step_with_runcs_reason(
    rootfs: Path, ids: IdRange
) -> None:
    lines: list[str] = []
    result = run_in_sandbox(
        rootfs, ["/no/such"], sandbox_env({}), "/", False, lines.append, ids=ids
    )
    assert result.exit_code != 0
    assert any("/no/such" in line for line in lines), lines


@needs_steps
def test_environment_is_the_image_env_and_the_step_runs_in_its_workdir(
    rootfs: Path, ids: IdRange
) -> None:
    os.environ["KILN_TEST_LEAK"] = "secret"
    try:
        result, lines = _run(rootfs, ids, "env | sort; pwd", env={"APP": "1"}, workdir="/srv")
    finally:
        del os.environ["KILN_TEST_LEAK"]
    assert result.exit_code == 0
    assert lines == ["APP=1", "HOME=/root", f"PATH={DEFAULT_PATH}", "PWD=/srv", "SHLVL=1", "/srv"]


@needs_steps
def test_network_is_off_by_default_only_loopback(rootfs: Path, ids: IdRange) -> None:
    result, lines = _run(rootfs, ids, "ip -o link | cut -d: -f2")
    assert result.exit_code == 0
    assert [line.strip() for line in lines] == ["lo"]


@needs_steps
def test_a_step_with_the_network_gets_an_address(rootfs: Path, ids: IdRange) -> None:
    """Only that it is attached: this machine has no internet to reach."""
    result, lines = _run(rootfs, ids, "ip -o -4 addr show dev eth0", network=True)
    assert result.exit_code == 0, lines
    assert len(lines) == 1 and re.search(r"\beth0\s+inet \d+\.\d+\.\d+\.\d+/\d+", lines[0])


@needs_steps
@pytest.mark.parametrize("network", [False, True])
def test_mount_points_runc_needed_do_not_stay_in_the_rootfs(
    rootfs: Path, ids: IdRange, network: bool
) -> None:
    top, etc = sorted(os.listdir(rootfs)), sorted(os.listdir(rootfs / "etc"))
    result, lines = _run(rootfs, ids, "echo x > /tmp/scratch; echo made > /made", network=network)
    assert (result.exit_code, lines) == (0, [])
    assert sorted(os.listdir(rootfs)) == sorted([*top, "made"])
    assert sorted(os.listdir(rootfs / "etc")) == etc


@needs_steps
def test_what_a_step_creates_is_owned_by_shifted_ids_with_umask_022(
    rootfs: Path, ids: IdRange
) -> None:
    result, lines = _run(rootfs, ids, "id -u; echo made > /made; mkdir /d /e; chown 42:43 /e")
    assert (result.exit_code, lines) == (0, ["0"])
    made, d, e = ((rootfs / name).lstat() for name in ("made", "d", "e"))
    assert (made.st_uid, made.st_gid, stat.S_IMODE(made.st_mode)) == (ids.base, ids.base, 0o644)
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (ids.base, ids.base, 0o755)
    assert (e.st_uid, e.st_gid) == (ids.base + 42, ids.base + 43)
    assert (rootfs / "made").read_text() == "made\n"


@needs_steps
def test_resolv_conf_is_never_bound_through_an_etc_symlink(rootfs: Path, ids: IdRange) -> None:
    os.rename(rootfs / "etc", rootfs / "real-etc")
    (rootfs / "etc").symlink_to("real-etc")
    with pytest.raises(KilnError, match="/etc is a symlink"):
        _run(rootfs, ids, "true", network=True)


def test_without_ids_nothing_runs_and_the_error_says_what_steps_need(tmp_path: Path) -> None:
    rootfs = build_busybox_rootfs(tmp_path / "rootfs", mount_points=())
    before = sorted(os.listdir(rootfs))
    with pytest.raises(KilnError, match=re.escape(STEPS_NEED)):
        _run(rootfs, None, "echo made > /made")
    assert sorted(os.listdir(rootfs)) == before
