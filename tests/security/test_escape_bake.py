"""The escape suite against bake ``run`` steps: ``probe.ATTACKS`` that apply to a
build step, run through :func:`kiln.oci.step.run_step` as the step's command on a
staged probe tree shifted into the home's range (root inside a user namespace,
Docker's build capabilities, seccomp, a pids limit, no network), then a few of
them as the ``run`` steps of a real ``kiln bake``, which must fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hostside
import pytest
from probe import (
    MALICIOUS_WORKDIRS,
    STEP,
    WORKDIR_ESCAPE,
    Attack,
    Host,
    Outcome,
    build_probe_tree,
    execute,
    finish_probe_tree,
    foreign_entries,
    iter_attacks,
    remove_device_nodes,
)

from busybox_tree import BUSYBOX
from kiln.errors import KilnError
from kiln.oci.idmap import IdRange, id_range
from kiln.oci.runc import RUN_ROOT, home_tag
from kiln.oci.step import STEP_PIDS, run_step

pytestmark = [
    pytest.mark.serial,  # the host's process count is watched: nothing else may run
    pytest.mark.skipif(os.geteuid() != 0, reason="runc steps need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed"),
]

# What a build step cannot be asked: it has no memory limit (as `docker build`).
UNSUPPORTED = {"sandbox:memory": "bake steps have no memory limit"}


@dataclass
class StepLab:
    home: Path
    ids: IdRange
    rootfs: Path
    host: Host
    sleep: hostside.HostSleep
    other_step: threading.Thread
    other_marker: str

    def send(self, command: str, timeout: float = 30.0) -> Outcome:
        lines: list[str] = []
        code, _ = run_step(
            self.rootfs,
            ["/bin/sh", "-c", command],
            {"PATH": "/bin"},
            "/",
            False,
            lines.append,
            ids=self.ids,
            home=self.home,
        )
        return Outcome(code, "\n".join(lines))


def _host_pids_with_cmdline(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    found.append(int(name))
    return found


@pytest.fixture(scope="module")
def step_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StepLab]:
    base = tmp_path_factory.mktemp("escape-bake")
    home = base / "home"
    home.mkdir(mode=0o700)
    ids = id_range(home)
    staging = base / "staging"
    staging.mkdir()
    rootfs = build_probe_tree(staging / "rootfs")
    finish_probe_tree(rootfs, ids.base, ids.base)
    other_root = build_probe_tree(staging / "other", devices=False)
    finish_probe_tree(other_root, ids.base, ids.base)
    marker = hostside.token("host-marker-content")
    marker_path = base / hostside.token("host-marker")
    marker_path.write_text(marker + "\n")
    marker_path.chmod(0o600)
    sleep = hostside.HostSleep()
    loopback = hostside.BannerServer("127.0.0.1", hostside.token("loopback-banner"))
    anywhere = hostside.BannerServer("0.0.0.0", hostside.token("anywhere-banner"))
    udp = hostside.DatagramCounter("0.0.0.0")
    abstract_name = hostside.token("kiln-escape-abstract")
    # Another step running alongside: kill(-1) and reboot in one step must not reach it.
    other_marker = f"3600.{int(time.time() * 1000) % 10**9:09d}1"
    other_result: list[int] = []

    def other() -> None:
        code, _ = run_step(
            other_root,
            ["sleep", other_marker],
            {"PATH": "/bin"},
            "/",
            False,
            lambda _line: None,
            ids=ids,
            home=home,
        )
        other_result.append(code)

    other_step = threading.Thread(target=other, daemon=True)
    other_step.start()
    addresses = hostside.host_addresses()
    bind_port = hostside.free_port()
    try:
        with (
            hostside.unix_listener(str(home / "agent.sock")),
            hostside.unix_listener("\0" + abstract_name),
        ):
            deadline = time.monotonic() + 10
            while not _host_pids_with_cmdline(other_marker):
                assert time.monotonic() < deadline, "the other step did not start"
                time.sleep(0.05)
            clock_offset = time.time() - time.monotonic()
            escaped = [
                Path("/", marker_path.name + ".escaped"),
                staging / (marker_path.name + ".escaped"),
            ]
            runc_path = Path(shutil.which("runc") or "/usr/sbin/runc")
            variables = {
                "home": str(home),
                "home_b64": hostside.b64(str(home)),
                "host_marker_path": str(marker_path),
                "host_marker_name": marker_path.name,
                "host_marker": marker,
                "host_shadow_line": hostside.shadow_first_line(),
                "host_pid": str(sleep.pid),
                "host_sleep_marker": sleep.marker,
                "host_sleep_marker_b64": hostside.b64(sleep.marker),
                # No bridge for a step: the host's own addresses stand in for the gateway.
                "gateway": addresses[0] if addresses else "127.0.0.1",
                "host_addresses": " ".join(addresses),
                "loopback_port": str(loopback.port),
                "loopback_banner": loopback.banner,
                "any_port": str(anywhere.port),
                "any_banner": anywhere.banner,
                "udp_port": str(udp.port),
                "abstract_socket": abstract_name,
                "bind_port": str(bind_port),
                "image_devices": "1",
                "pids_limit": str(STEP_PIDS),
                "hold_count": str(STEP_PIDS + 50),
                "hold_seconds": "120",
                "bomb_seconds": "2",
                "host_process_rise_limit": str(STEP_PIDS + 200),
            }
            observations: dict[str, Callable[[], object]] = {
                "core_pattern": lambda: Path("/proc/sys/kernel/core_pattern").read_text(),
                "sysctl_fingerprint": hostside.sysctl_fingerprint,
                "modules": hostside.loaded_modules,
                "hostname": lambda: Path("/proc/sys/kernel/hostname").read_text(),
                "clock": lambda: abs(time.time() - time.monotonic() - clock_offset) < 60,
                "host_sleep_alive": sleep.alive,
                "other_sandbox_alive": lambda: bool(_host_pids_with_cmdline(other_marker)),
                "runc_binary": lambda: hostside.sha256_file(runc_path),
                "loopback_accepts": lambda: loopback.accepted,
                "any_accepts": lambda: anywhere.accepted,
                "udp_datagrams": lambda: udp.received,
                "host_listener_on_bind_port": lambda: hostside.host_listener_on(bind_port),
                "staging_siblings": lambda: (
                    sorted(p.name for p in staging.iterdir()),
                    [p.exists() for p in escaped],
                ),
                "foreign_entries": lambda: foreign_entries(rootfs, ids.base, ids.base + ids.size),
            }
            step_prefix = f"kiln-{home_tag(home)}-step-"
            host = Host(
                kind="bake step",
                variables=variables,
                observations=observations,
                monitors={
                    "host_process_rise": lambda: hostside.ProcessSampler().rise,
                    "sandbox_pids_peak": lambda: hostside.ProcessSampler(step_prefix).sandbox_peak,
                },
                sandboxes={"own", "pids"},
                secret_names={"host_shadow_line", "host_marker"},
            )
            yield StepLab(home, ids, rootfs, host, sleep, other_step, other_marker)
    finally:
        for pid in _host_pids_with_cmdline(other_marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        other_step.join(timeout=10)
        sleep.close()
        loopback.close()
        anywhere.close()
        udp.close()
        remove_device_nodes(staging)
        for path in (Path("/", marker_path.name + ".escaped"),):
            with contextlib.suppress(OSError):
                path.unlink()
        _forget_run_state(home)


def _forget_run_state(home: Path) -> None:
    """run_step leaves the home's (empty) runc root and steps dir under /run/kiln."""
    shutil.rmtree(RUN_ROOT / home_tag(home), ignore_errors=True)


ATTACKS = list(iter_attacks(STEP))


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_escape_from_a_bake_step(attack: Attack, step_lab: StepLab) -> None:
    missing = step_lab.host.missing(attack)
    reasons = {UNSUPPORTED[m] for m in missing if m in UNSUPPORTED}
    if reasons:
        pytest.skip("; ".join(sorted(reasons)))
    assert not missing, f"the bake-step runner lacks {missing}"
    outcome = execute(attack, step_lab.host, step_lab.send)
    print(f"{attack.name}: blocked, exit {outcome.exit_code}, measured {outcome.measured}")
    print(outcome.output[-1500:])


def test_control_a_step_is_root_of_a_shifted_user_namespace_with_build_capabilities(
    step_lab: StepLab,
) -> None:
    outcome = step_lab.send("cat /proc/self/uid_map; id -u; grep CapEff /proc/self/status")
    assert outcome.exit_code == 0, outcome
    mapping, uid, caps = outcome.output.splitlines()
    assert mapping.split() == ["0", str(step_lab.ids.base), str(step_lab.ids.size)]
    assert uid == "0"
    assert int(caps.split()[1], 16) != 0


def test_control_a_step_writes_its_own_root_with_shifted_owners(step_lab: StepLab) -> None:
    outcome = step_lab.send("echo made > /made-by-step && chown 65534:65534 /made-by-step")
    assert outcome.exit_code == 0, outcome
    made = step_lab.rootfs / "made-by-step"
    try:
        st = made.lstat()
        assert (st.st_uid, st.st_gid) == (step_lab.ids.base + 65534,) * 2
    finally:
        made.unlink()


@pytest.mark.parametrize("workdir", MALICIOUS_WORKDIRS)
def test_a_malicious_workdir_does_not_put_a_step_on_the_host(
    workdir: str, step_lab: StepLab
) -> None:
    """CVE-2024-21626 through a recipe's ``workdir``: refused, or a cwd inside the root."""
    lines: list[str] = []
    command = WORKDIR_ESCAPE.format(**step_lab.host.variables)
    code, _ = run_step(
        step_lab.rootfs,
        ["/bin/sh", "-c", command],
        {"PATH": "/bin"},
        workdir,
        False,
        lines.append,
        ids=step_lab.ids,
        home=step_lab.home,
    )
    print(f"{workdir}: exit {code}: {lines[-3:]}")
    assert code != 0, lines
    assert not any("ESCAPED" in x or step_lab.host.variables["host_marker"] in x for x in lines)


def test_control_tftp_reaches_the_udp_counter(step_lab: StepLab) -> None:
    """The UDP attack's sender works: run from the host, it reaches the counter (from a
    step, networked or not, it must not: the host answers the bridge on no UDP port)."""
    variables = step_lab.host.variables
    before = step_lab.host.observations["udp_datagrams"]()
    subprocess.run(
        [str(BUSYBOX), "timeout", "1", str(BUSYBOX), "tftp", "-g", "-r", "x", "-l", "/dev/null",
         "127.0.0.1", str(variables["udp_port"])],
        capture_output=True,
        check=False,
    )  # fmt: skip
    deadline = time.monotonic() + 2
    while step_lab.host.observations["udp_datagrams"]() == before:
        assert time.monotonic() < deadline, "tftp never reached the host's UDP port"
        time.sleep(0.05)


def test_a_networked_step_cannot_reach_host_loopback_services(step_lab: StepLab) -> None:
    # Found by this suite when networked steps shared the host's network namespace;
    # they now get an address on the home's bridge, masqueraded, like docker build's.
    variables = step_lab.host.variables
    lines: list[str] = []
    run_step(
        step_lab.rootfs,
        [
            "/bin/sh",
            "-c",
            f"nc -w 2 127.0.0.1 {variables['loopback_port']} < /dev/null; "
            f"grep -F '@{variables['abstract_socket']}' /proc/net/unix",
        ],
        {"PATH": "/bin"},
        "/",
        True,
        lines.append,
        ids=step_lab.ids,
        home=step_lab.home,
    )
    output = "\n".join(lines)
    assert variables["loopback_banner"] not in output, output
    assert variables["abstract_socket"] not in output, output


# -- a real bake whose run steps attempt escapes


BAKE_ATTACKS = {
    "mount": "mount -t tmpfs none /tmp",
    "mknod": "mknod /dev-sda b 8 0",
    "core_pattern": "echo '|/tmp/pwn' > /proc/sys/kernel/core_pattern",
    "host_file": "cat /proc/1/root{host_marker_path} || cat {host_marker_path}",
    "kill_host": "kill -9 {host_pid}",
}


@pytest.fixture
def bake_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Callable[..., Path]:
    home = tmp_path / "kiln-home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("KILN_HOME", str(home))

    request.addfinalizer(lambda: _forget_run_state(home))

    def make(steps: list[str], workdir: str | None = None) -> Path:
        root = tmp_path / "proj"
        (root / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BUSYBOX, root / "rootfs" / "bin" / "busybox")
        os.chmod(root / "rootfs" / "bin" / "busybox", 0o755)
        for applet in ("sh", "cat", "mount", "mknod", "kill", "echo", "ln", "true", "mkdir"):
            link = root / "rootfs" / "bin" / applet
            if not link.is_symlink():
                link.symlink_to("busybox")
        lines = ['{ copy = "rootfs/", to = "/" }']
        for index, step in enumerate(steps):
            if workdir is not None and index == len(steps) - 1:
                lines.append(f'{{ workdir = "{workdir}" }}')
            lines.append("{ run = " + _toml_string(step) + " }")
        recipe = (
            '[project]\nname = "escape"\n\n[images.esc]\nfrom = "scratch"\nsteps = [\n  '
            + ",\n  ".join(lines)
            + '\n]\ncmd = ["/bin/sh"]\n'
        )
        (root / "kiln.toml").write_text(recipe)
        return root

    return make


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bake(root: Path) -> None:
    from kiln.image.bake import bake
    from kiln.spec import load_spec

    bake(load_spec(root / "kiln.toml"), no_cache=True)


def test_control_a_real_bake_runs_a_benign_step(bake_project: Callable[..., Path]) -> None:
    _bake(bake_project(["echo hello > /hello"]))


def test_control_a_real_bake_runs_its_steps_as_root_of_a_user_namespace(
    bake_project: Callable[..., Path],
) -> None:
    """Which sandbox the bake path uses today: runc in the home's range, not bwrap as root."""
    with pytest.raises(KilnError) as failure:
        _bake(bake_project(["cat /proc/self/uid_map; exit 3"]))
    mapping = next(
        line.split() for line in str(failure.value).splitlines() if line.split()[:1] == ["0"]
    )
    assert mapping[1] != "0" and mapping[2] == "65536", mapping


@pytest.mark.parametrize("name", list(BAKE_ATTACKS))
def test_a_real_bake_whose_run_step_attempts_an_escape_fails(
    name: str, bake_project: Callable[..., Path], step_lab: StepLab
) -> None:
    command = BAKE_ATTACKS[name].format(**step_lab.host.variables)
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    with pytest.raises(KilnError, match=r"step 2 \(run\): exit [1-9]"):
        _bake(bake_project([command]))
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
    assert step_lab.sleep.alive()


def test_a_real_bake_never_creates_a_workdir_through_a_symlink_onto_the_host(
    bake_project: Callable[..., Path], tmp_path: Path
) -> None:
    """A step plants ``/srv -> <host dir>``; a later ``workdir = "/srv/pwned"`` must not
    make the bake (host root, host paths) create ``<host dir>/pwned``."""
    target = tmp_path / "host-dir"
    target.mkdir()
    with contextlib.suppress(KilnError):
        _bake(bake_project([f"ln -s {target} /srv", "true"], workdir="/srv/pwned"))
    assert not (target / "pwned").exists()
    assert list(target.iterdir()) == []


def test_a_real_bake_is_not_hung_by_a_fifo_a_step_leaves(
    bake_project: Callable[..., Path],
) -> None:
    """Turning the step's changes into a layer never opens what the step made for reading:
    a FIFO would block the bake (as root, on the host) forever."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _bake(bake_project(["mkfifo /blocker && ln -s /proc/self/fd/0 /stdin-link"]))
        except BaseException as e:  # the outcome is reported below
            errors.append(e)

    baker = threading.Thread(target=run, daemon=True)
    baker.start()
    baker.join(timeout=30)
    assert not baker.is_alive(), "the bake hangs on the FIFO its step left"
    print(f"bake with a FIFO: {errors or 'baked'}")
