"""The escape suite against the Docker runtime: every attack of ``probe.ATTACKS`` from
inside a real container of a private engine, as the image user (65534) and as root
inside, through the same probe app as ``test_escape_local.py``.

Docker's model is not the local runtime's, and where it differs the difference is a
test of its own, named ``test_docker_difference_…``, asserting what Docker gives
instead (the attack is skipped for that user, with the name of that test):

* No user namespace (the private engine, like a default one, does not remap): root
  inside is uid 0 outside. It holds no capability, runs with no-new-privileges,
  Docker's default seccomp profile and a read-only root, so the kernel attacks still
  fail; but in a volume, files of host root are its own files.
* The host's services listening on every address are reachable through the network's
  gateway: Docker filters forwarding, not what the host itself accepts.
* This engine runs without its firewall (``--iptables=false``), so its networks are
  neither internal nor isolated here; tests/runtime/test_docker_runtime.py shows both
  enforced by an engine with its firewall on.

Attacks carried by device nodes in the image do not apply: Kiln's layers leave
device nodes out, so no Kiln image can carry one.
"""

# ruff: noqa: F811 - the docker_engine fixture is imported by name and used as a parameter
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import hostside
import pytest
from container_lab import (
    APP_PORT,
    DEDICATED,
    HTTP,
    MEMORY_LIMIT_MB,
    PIDS_LIMIT,
    RACE_SECONDS,
    USERS,
    HostTargets,
    Probe,
    assert_host_services_answer_but_not_its_loopback,
    assert_log_lines_cut_at,
    assert_root_inside_writes_its_own_dev_but_not_the_init,
    attack_id,
    attack_variables,
    follower_monitors,
    host_observations,
    log_path,
    other_spec,
    probe_spec,
    run_attack,
    sandbox_host,
    shared_attacks,
    skip_if_differs,
    status_fields,
    uid,
)
from probe import (
    AFTER_IMAGE_TRICK,
    IMAGE_TRICKS,
    INSTANCE,
    MALICIOUS_WORKDIRS,
    WORKDIR_ESCAPE,
    Attack,
    Host,
    attack_named,
    build_probe_tree,
    build_trick_layer,
    execute,
    file_state,
    finish_probe_tree,
    foreign_entries,
    iter_attacks,
)

from busybox_tree import BUSYBOX
from dockerd import Dockerd, docker_engine, image_from_trees, tear_down  # noqa: F401
from kiln.image.store import ImageStore
from kiln.observe.logs import LogStore
from kiln.runtime import InstanceSpec, InstanceStatus, RuntimeFailure, VolumeMount
from kiln.runtime.docker import MAX_LINE, DockerRuntime
from leftovers import assert_nothing_left

pytestmark = [
    pytest.mark.serial,  # the host's process count is watched: nothing else may run
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the private engine needs root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed"),
]

ALL_USERS = frozenset(USERS)

DOCKER_DIFFERENCES: dict[str, tuple[frozenset[str], str]] = {
    "connect_host_unpublished_port": (
        ALL_USERS,
        "test_docker_difference_host_services_on_every_address_answer_through_the_gateway",
    ),
    "connect_host_other_addresses": (
        ALL_USERS,
        "test_docker_difference_host_services_on_every_address_answer_through_the_gateway",
    ),
    "udp_to_the_host": (
        ALL_USERS,
        "test_docker_difference_host_services_on_every_address_answer_through_the_gateway",
    ),
    "reach_other_instance_directly": (
        ALL_USERS,
        "test_docker_difference_without_the_engines_firewall_instances_reach_each_other",
    ),
    "write_host_exe_runc_tini": (
        frozenset({"root-inside"}),
        "test_docker_difference_root_inside_writes_its_own_dev_but_not_the_init",
    ),
    "volume_chown_host_file": (
        frozenset({"root-inside"}),
        "test_docker_difference_root_inside_owns_host_root_files_in_a_volume_yet_gains_nothing",
    ),
    "volume_plant_setuid_or_device": (
        frozenset({"root-inside"}),
        "test_docker_difference_root_inside_owns_host_root_files_in_a_volume_yet_gains_nothing",
    ),
}
"""Attacks that succeed by Docker's design for these users, and the test that says so."""

NOT_APPLICABLE = {
    "mount_host_disk": "Kiln's layers leave device nodes out: no image can carry a disk node",
    "open_device_nodes_in_image": "Kiln's layers leave device nodes out: no image carries one",
}


# -- the probe instance and the module's lab: engine, home, image, runtime, host targets,
# another instance


def _host_pid(probe: Probe) -> int:
    """The probe app's pid on this machine (the engine's view of its container)."""
    assert isinstance(probe.runtime, DockerRuntime)
    attrs = probe.runtime.api.inspect_container(probe.handle.data["container_id"])
    return int(attrs["State"]["Pid"])


@dataclass
class Lab(HostTargets):
    engine: Dockerd
    home: Path
    image: str
    runtime: DockerRuntime
    other: Probe
    clock_offset: float
    probes: dict[str, Probe] = field(default_factory=dict)

    def spec(self, name: str, user: str | None, **overrides: Any) -> InstanceSpec:
        return probe_spec(self.image, name, user, **overrides)

    def start(self, name: str, user: str | None, **overrides: Any) -> Probe:
        return Probe(self.runtime, self.runtime.start(self.spec(name, user, **overrides)), user)

    def volume_dir(self, volume: str) -> Path:
        """Where the engine keeps one of the home's volumes on this machine."""
        name = self.runtime.volume_name(volume)
        return Path(self.runtime.api.inspect_volume(name)["Mountpoint"])

    def gateway(self) -> str:
        network = self.runtime.api.inspect_network(self.runtime.network_name(False))
        return str(network["IPAM"]["Config"][0]["Gateway"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, docker_engine: Dockerd) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("escape-docker")
    home = base / "home"
    home.mkdir(mode=0o700)
    layer = build_probe_tree(base / "layer", devices=False)
    finish_probe_tree(layer, 0, 0)
    image = image_from_trees(ImageStore(home / "images"), [layer])
    runtime = DockerRuntime(home, docker_engine.host)
    targets = HostTargets.create(base)
    try:
        with (
            hostside.unix_listener(str(home / "agent.sock")),
            hostside.unix_listener("\0" + targets.abstract_name),
        ):
            other = Probe(runtime, runtime.start(other_spec(image, targets)), None)
            other.wait_ready()
            yield Lab(
                **targets.targets(),
                engine=docker_engine,
                home=home,
                image=image,
                runtime=runtime,
                other=other,
                clock_offset=time.time() - time.monotonic(),
            )
    finally:
        tear_down(runtime)
        with contextlib.closing(
            docker.APIClient(base_url=docker_engine.host, version="auto")
        ) as api:
            for volume in (
                api.volumes(filters={"label": f"dev.kiln.home={runtime.tag}"})["Volumes"] or []
            ):
                api.remove_volume(volume["Name"], force=True)
        targets.close()
        assert_nothing_left(home, [targets.other_secret.encode()])
        shutil.rmtree(home / "logs", ignore_errors=True)


@pytest.fixture(scope="module", params=list(USERS))
def probe(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Probe]:
    """The module's probe instance for one user, with a volume holding a host-root file."""
    key = str(request.param)
    user = USERS[key]
    started = lab.start(
        f"probe-{key}",
        user,
        volumes=(VolumeMount(f"data-{key}", "/data"),),
        service=f"probe-{key}",
    )
    hostfile = lab.volume_dir(f"data-{key}") / "hostfile"
    hostfile.write_text("owned by host root\n")
    hostfile.chmod(0o644)
    try:
        started.wait_ready()
        lab.probes[key] = started
        yield started
    finally:
        lab.probes.pop(key, None)
        started.stop()


def _key(probe: Probe) -> str:
    return next(k for k, v in USERS.items() if v == probe.user)


def _log_path(lab: Lab, probe: Probe) -> Path:
    service = probe.handle.instance_id
    return log_path(lab.home, service, service)


def _layer_dirs(lab: Lab, probe: Probe) -> list[Path]:
    """The image's layers and the container's own upper layer, as the engine stores them."""
    attrs = lab.runtime.api.inspect_container(probe.handle.data["container_id"])
    data = attrs["GraphDriver"]["Data"]
    return [Path(p) for p in [*data["LowerDir"].split(":"), data["UpperDir"]]]


def host_for(lab: Lab, probe: Probe, key: str, volume_name: str) -> Host:
    """Variables and host observations for attacks from ``probe`` (whose volume at
    /data is the home's ``volume_name``)."""
    runtime = lab.runtime
    user_id = uid(probe.user)
    volume = lab.volume_dir(volume_name)
    variables = attack_variables(lab.home, lab, lab.other, lab.gateway(), 512 + 64)
    variables["volume"] = "/data"
    layers = _layer_dirs(lab, probe)

    def exec_during() -> None:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            runtime.exec(probe.handle, ["/bin/sh", "-c", "sleep 0.05"], 10)

    log = _log_path(lab, probe)
    observations = host_observations(
        lab, lab.other, probe, layers, int(variables["bind_port"]), log, lab.clock_offset
    )
    observations["volume_hostfile"] = lambda: file_state(volume / "hostfile")
    observations["volume_foreign"] = lambda: foreign_entries(volume, user_id, user_id + 1)
    return Host(
        kind=f"docker runtime ({key})",
        variables=variables,
        observations=observations,
        monitors=follower_monitors(log),
        actions={"exec_during": exec_during},
        sandboxes={"own", "pids", "memory"},
        secret_names={"host_shadow_line", "host_marker", "other_secret"},
    )


SHARED = shared_attacks(NOT_APPLICABLE)


def test_the_attacks_that_do_not_apply_are_exactly_those_carried_by_image_devices() -> None:
    needing_devices = {a.name for a in iter_attacks(INSTANCE) if "image_devices" in a.needs}
    assert set(NOT_APPLICABLE) == needing_devices
    assert set(DOCKER_DIFFERENCES) <= {a.name for a in SHARED}


# -- controls: the probe can do what an app may, so a blocked attack means something


def test_control_the_probe_runs_commands_as_its_user(probe: Probe) -> None:
    outcome = probe.send("id -u; echo hi > /tmp/ok && cat /tmp/ok; touch /data/mine && echo vol")
    assert outcome.exit_code == 0, outcome
    assert outcome.output.split() == [str(uid(probe.user)), "hi", "vol"]


def test_control_the_host_reaches_the_other_instance_and_its_secret_is_there(lab: Lab) -> None:
    with HTTP.open(lab.other.url("/index.html"), timeout=5) as response:
        assert response.read().decode().strip() == lab.other_banner
    code, out = lab.runtime.exec(
        lab.other.handle, ["cat", f"/run/secrets/{lab.other_secret_name}"], 10
    )
    assert (code, out) == (0, lab.other_secret)
    assert lab.other_log_marker in (lab.home / "logs" / "other" / "other.log").read_text()


def test_log_lines_are_cut_at_exactly_64_kib(probe: Probe, lab: Lab) -> None:
    assert_log_lines_cut_at(probe, _log_path(lab, probe), MAX_LINE)


# -- the attacks


@pytest.mark.parametrize("attack", SHARED, ids=attack_id)
def test_escape(attack: Attack, probe: Probe, lab: Lab) -> None:
    key = _key(probe)
    skip_if_differs(DOCKER_DIFFERENCES, attack, key, "Docker")
    run_attack(attack, host_for(lab, probe, key, f"data-{key}"), probe.send)
    assert probe.alive(), "the probe died under the attack"


@pytest.mark.parametrize("attack", DEDICATED, ids=attack_id)
def test_escape_in_its_own_sandbox(attack: Attack, probe: Probe, lab: Lab) -> None:
    key = _key(probe)
    host = host_for(lab, probe, key, f"data-{key}")
    overrides: dict[str, Any] = {}
    if attack.sandbox == "pids":
        overrides["pids"] = PIDS_LIMIT
    elif attack.sandbox == "memory":
        overrides["memory"] = MEMORY_LIMIT_MB * 1024 * 1024
    own = lab.start(
        f"{attack.sandbox}-{attack.name}-{key}".replace("_", "-"), probe.user, **overrides
    )
    try:
        own.wait_ready()
        own_host = sandbox_host(
            host,
            attack,
            lambda: str(own.handle.data["container_id"]),
            lambda: _host_pid(own),
            lambda: lab.other.alive() and probe.alive(),
        )
        run_attack(attack, own_host, own.send)
        if attack.sandbox == "memory":
            state = own.runtime.stop(own.handle, 0.0)
            assert state.oom_killed, f"the OOM kill was not recorded: {state}"
    finally:
        own.stop()


# -- where Docker's model differs: what it gives instead


def _status(pid: str | int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_docker_difference_root_inside_is_root_outside_but_holds_no_privilege(
    probe: Probe, lab: Lab
) -> None:
    if probe.user is not None:
        pytest.skip("about root inside")
    assert lab.runtime.capabilities.user_namespace is False
    outside = _status(_host_pid(probe))
    assert outside["Uid"].split() == ["0", "0", "0", "0"]  # the difference: no remapping
    inside = probe.send(
        "grep -E '^(Uid|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status; "
        "touch /root-was-here 2>&1"
    )
    fields = status_fields(inside.output)
    assert fields["Uid"].split() == ["0", "0", "0", "0"]
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[name] == "0000000000000000", (name, fields[name])
    assert (fields["NoNewPrivs"], fields["Seccomp"]) == ("1", "2")
    assert "Read-only file system" in inside.output


def test_docker_difference_root_inside_owns_host_root_files_in_a_volume_yet_gains_nothing(
    probe: Probe, lab: Lab
) -> None:
    if probe.user is not None:
        pytest.skip("about root inside")
    volume = lab.volume_dir("data-root-inside")
    planted = probe.send(
        "echo appended >> /data/hostfile && echo wrote; "
        "cp /suid/busybox /data/sbb && chmod 4755 /data/sbb && ln -sf sbb /data/su && "
        "echo planted; "
        "chown 65534:65534 /data/hostfile 2>&1; mknod /data/sda b 8 0 2>&1; exit 0"
    )
    # The difference: host root's file is root inside's own file.
    assert "wrote" in planted.output and "planted" in planted.output
    assert (volume / "hostfile").read_text().endswith("appended\n")
    assert (volume / "sbb").stat().st_mode & 0o4000 and (volume / "sbb").stat().st_uid == 0
    # What Docker gives instead: no capability to give a file away or make a device...
    assert "chown: /data/hostfile: Operation not permitted" in planted.output
    assert "mknod: /data/sda: Operation not permitted" in planted.output
    assert (volume / "hostfile").stat().st_uid == 0 and not (volume / "sda").exists()
    # ...and a setuid-root file in a volume gives an instance's user nothing: with
    # no-new-privileges busybox su runs with the caller's euid and gives up at once.
    user = lab.start(
        "suid-user", "65534:65534", volumes=(VolumeMount("data-root-inside", "/data"),)
    )
    try:
        user.wait_ready()
        mounted = user.send("grep ' /data ' /proc/self/mountinfo").output.split()
        assert "nosuid" not in mounted[5]  # the volume honours setuid: nnp is what stops it
        ran = user.send("ls -l /data/sbb; /data/su root < /dev/null; id -u")
        assert "-rwsr-xr-x" in ran.output and "must be suid to work properly" in ran.output
        assert ran.output.strip().endswith("65534")
    finally:
        user.stop()
        for planted_file in ("sbb", "su"):
            (volume / planted_file).unlink()


def test_docker_difference_root_inside_writes_its_own_dev_but_not_the_init(
    probe: Probe, lab: Lab
) -> None:
    if probe.user is not None:
        pytest.skip("about root inside")
    # The difference: Docker's /dev is a tmpfs of the container's own, writable by its root.
    assert_root_inside_writes_its_own_dev_but_not_the_init(probe)


def test_docker_difference_host_services_on_every_address_answer_through_the_gateway(
    probe: Probe, lab: Lab
) -> None:
    # The difference: what listens on every address of the host answers an instance;
    # what stays out of reach is the host's loopback (the instance has its own).
    assert_host_services_answer_but_not_its_loopback(probe, lab, lab.gateway())


def test_docker_difference_without_the_engines_firewall_instances_reach_each_other(
    probe: Probe, lab: Lab
) -> None:
    outcome = probe.send(f"nc -w 2 {lab.other.address} {APP_PORT} < /dev/null; exit 0")
    request = probe.send(
        f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {lab.other.address} {APP_PORT}"
    )
    # The difference, on an engine run with --iptables=false: nothing filters the bridge.
    assert lab.other_banner in request.output, (outcome, request)
    # What the runtime asks for, which an engine with its firewall enforces (see
    # tests/runtime/test_docker_runtime.py): an internal network without inter-container
    # traffic.
    network = lab.runtime.api.inspect_network(lab.runtime.network_name(False))
    assert network["Internal"] is True
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"


def test_an_exec_runs_as_confined_as_the_app(probe: Probe, lab: Lab) -> None:
    """An exec (exec health checks) gets the app's user, caps, seccomp and nnp."""
    fields = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    command = "grep -E '^(" + "|".join(fields) + "|Seccomp):' /proc/self/status"
    app = probe.send(command)
    code, out = lab.runtime.exec(probe.handle, ["sh", "-c", command], 10)
    assert app.exit_code == 0 and code == 0, (app, out)
    assert sorted(out.splitlines()) == sorted(app.output.splitlines())
    assert "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out


# -- attacks carried by the image or the spec


@pytest.mark.parametrize("workdir", MALICIOUS_WORKDIRS)
def test_a_malicious_workdir_does_not_put_the_app_on_the_host(workdir: str, lab: Lab) -> None:
    """CVE-2024-21626: the app starts elsewhere or not at all, never with a host cwd."""
    name = "wd-" + workdir.strip("/").replace("/", "-")
    command = WORKDIR_ESCAPE.format(host_marker_path=str(lab.marker_path))
    spec = lab.spec(name, None, command=["sh", "-c", command], workdir=workdir, service=name)
    try:
        handle = lab.runtime.start(spec)
    except RuntimeFailure as e:
        print(f"{workdir}: refused at start: {e}")
        return
    try:
        state = lab.runtime.wait(handle, 15)
        lab.runtime.destroy(handle)
        lines = [x.line for x in LogStore(lab.home / "logs").read(name, name)]
        print(f"{workdir}: {state}, log {lines}")
        assert state.status is InstanceStatus.EXITED, state
        assert state.exit_code != 0, (state, lines)
        assert not any("ESCAPED" in x or lab.marker in x for x in lines), lines
    finally:
        lab.runtime.destroy(handle)


@pytest.mark.parametrize("trick", list(IMAGE_TRICKS))
def test_a_malicious_image_layer_does_not_redirect_the_sandbox_mounts(
    trick: str, lab: Lab, tmp_path: Path
) -> None:
    """A top layer turns a mount point (or a volume target) into a symlink: the
    instance is refused, or starts with every kernel interface still guarded."""
    store = ImageStore(lab.home / "images")
    base = build_probe_tree(tmp_path / "base", devices=False)
    finish_probe_tree(base, 0, 0)
    evil = build_trick_layer(tmp_path / "evil", IMAGE_TRICKS[trick], 0, 0)
    name = "trick-" + trick.replace("_", "-")[:40]
    spec = lab.spec(
        name,
        None,
        image_digest=image_from_trees(store, [base, evil]),
        volumes=(VolumeMount("trick", "/data"),),
        secrets={"token": b"not-a-real-secret"},
        service=name,
    )
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    try:
        handle = lab.runtime.start(spec)
    except RuntimeFailure as e:
        print(f"{trick}: refused at start: {e}")
        assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
        assert not lab.runtime.secrets_dir(name).exists()
        return
    tricked = Probe(lab.runtime, handle, None)
    try:
        try:
            tricked.wait_ready(timeout=5)
        except AssertionError:
            print(f"{trick}: started but does not serve: {lab.runtime.inspect(handle)}")
            return
        lab.probes["tricked"] = tricked
        host = host_for(lab, tricked, "root-inside", "trick")
        for attack_name in AFTER_IMAGE_TRICK:
            outcome = execute(attack_named(attack_name), host, tricked.send)
            print(f"{trick} / {attack_name}: blocked, exit {outcome.exit_code}")
    finally:
        lab.probes.pop("tricked", None)
        tricked.stop()
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
