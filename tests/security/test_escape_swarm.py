"""The escape suite against the Swarm runtime: every attack of ``probe.ATTACKS`` from
inside a real task of the three-node swarm of tests/swarm_cluster.py, as the image user
(65534) and as root inside, through the same probe app as the other runtimes, reached at
its node's address and published port.

Swarm's model is not the Docker runtime's, and where it differs the difference is a
test of its own, named ``test_swarm_difference_…``, asserting what Swarm gives instead
(the attack is skipped for that user, with the name of that test):

* The task runs on some node, in a network namespace of its own behind that node's: the
  host-side targets of this machine's root namespace are on none of its addresses, so
  its loopback is not the host's. But ``network = "private"`` is not enforced on Swarm
  (documented): the host's services on every address answer it, and instances reach
  each other on the overlay network and at their nodes' published ports.
* Swarm's service API (1.41 on these engines) has no no-new-privileges and no custom
  seccomp profile: a setuid-root file of the image gives the image user euid 0. That
  root holds no capability (every one dropped, from the bounding set too) under
  Docker's default seccomp profile and a read-only root: the position root inside
  has, which every attack below shows confined.
* Root inside writes its own ``/dev`` (a tmpfs of the task's), as on Docker.
* An OOM kill is recorded by the node's engine, not in Swarm's task status.

Attacks carried by device nodes in the image do not apply (Kiln's layers leave them
out), nor do the volume attacks: the Swarm runtime refuses volumes. Swarm has no exec
through the manager, so the exec race runs ``docker exec`` on the task's node, as an
operator would.
"""

# ruff: noqa: F811 - the swarm_cluster fixture is imported by name and used as a parameter
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostside
import pytest
from container_lab import (
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
    INSTANCE,
    Attack,
    Host,
    build_probe_tree,
    finish_probe_tree,
    iter_attacks,
)

from busybox_tree import BUSYBOX
from dockerd import image_from_trees
from kiln.image.registry import RegistryOptions
from kiln.image.store import ImageStore
from kiln.runtime import InstanceSpec, RuntimeFailure, VolumeMount
from kiln.runtime.docker import DEFAULT_TMPFS_SIZE, LABEL_INSTANCE, MAX_LINE
from kiln.runtime.swarm import SwarmRuntime
from swarm_cluster import SwarmCluster, swarm_cluster  # noqa: F401

pytestmark = [
    pytest.mark.serial,  # the host's process count is watched: nothing else may run
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="a swarm of engines needs root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed"),
]

ALL_USERS = frozenset(USERS)

_OPEN_NETWORK = "test_swarm_difference_private_is_not_enforced_the_hosts_addresses_answer"
SWARM_DIFFERENCES: dict[str, tuple[frozenset[str], str]] = {
    "connect_host_unpublished_port": (ALL_USERS, _OPEN_NETWORK),
    "connect_host_other_addresses": (ALL_USERS, _OPEN_NETWORK),
    "udp_to_the_host": (ALL_USERS, _OPEN_NETWORK),
    "reach_other_instance_directly": (
        ALL_USERS,
        "test_swarm_difference_instances_reach_each_other_on_the_overlay_and_published_ports",
    ),
    "setuid_root_binary": (
        frozenset({"image-user"}),
        "test_swarm_difference_a_setuid_root_file_gives_the_user_euid_0_without_a_capability",
    ),
    "write_host_exe_runc_tini": (
        frozenset({"root-inside"}),
        "test_swarm_difference_root_inside_writes_its_own_dev_but_not_the_init",
    ),
}
"""Attacks that succeed by Swarm's design for these users, and the test that says so."""

NOT_APPLICABLE = {
    "mount_host_disk": "Kiln's layers leave device nodes out: no image can carry a disk node",
    "open_device_nodes_in_image": "Kiln's layers leave device nodes out: no image carries one",
    "volume_chown_host_file": "the swarm runtime refuses volumes (test_swarm_refuses_a_volume)",
    "volume_plant_setuid_or_device": "the swarm runtime refuses volumes "
    "(test_swarm_refuses_a_volume)",
}

SHARED = shared_attacks(NOT_APPLICABLE)
SANDBOXES = [(a, key) for a in DEDICATED for key in USERS]


# -- the module's lab: swarm, home, image, runtime, host targets, probes, another instance


@dataclass
class Lab(HostTargets):
    cluster: SwarmCluster
    home: Path
    image: str
    runtime: SwarmRuntime
    node_apis: dict[str, Any]
    other: Probe
    clock_offset: float
    probes: dict[str, Probe] = field(default_factory=dict)
    sandboxes: dict[tuple[str, str], Probe] = field(default_factory=dict)

    def spec(self, name: str, user: str | None, **overrides: Any) -> InstanceSpec:
        return probe_spec(self.image, name, user, **{"service": name, **overrides})

    def start(self, name: str, user: str | None, **overrides: Any) -> Probe:
        return Probe(self.runtime, self.runtime.start(self.spec(name, user, **overrides)), user)

    def node_api(self, probe: Probe) -> Any:
        """The engine of the node the probe's task runs on."""
        return self.node_apis[probe.address]

    def container(self, probe: Probe) -> dict[str, Any]:
        """The probe's container, as its node's engine sees it."""
        api = self.node_api(probe)
        label = f"{LABEL_INSTANCE}={probe.handle.instance_id}"
        found = api.containers(filters={"label": label, "status": "running"})
        assert found, f"no running container of {probe.handle.instance_id} on {probe.address}"
        attrs: dict[str, Any] = api.inspect_container(found[0]["Id"])
        return attrs

    def host_pid(self, probe: Probe) -> int:
        return int(self.container(probe)["State"]["Pid"])

    def log(self, probe: Probe) -> Path:
        return log_path(self.home, probe.handle.instance_id, probe.handle.instance_id)


def _sandbox_name(attack: Attack, key: str) -> str:
    return f"{attack.sandbox}-{attack.name}-{key}".replace("_", "-")


def _sandbox_overrides(attack: Attack) -> dict[str, Any]:
    if attack.sandbox == "pids":
        return {"pids": PIDS_LIMIT}
    if attack.sandbox == "memory":
        return {"memory": MEMORY_LIMIT_MB * 1024 * 1024}
    return {}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, swarm_cluster: SwarmCluster) -> Iterator[Lab]:
    """Every instance the module needs, started at once (a task takes seconds to be placed)."""
    base = tmp_path_factory.mktemp("escape-swarm")
    home = base / "home"
    home.mkdir(mode=0o700)
    layer = build_probe_tree(base / "layer", devices=False)
    finish_probe_tree(layer, 0, 0)
    image = image_from_trees(ImageStore(home / "images"), [layer])
    runtime = SwarmRuntime(
        home,
        swarm_cluster.manager.host,
        f"{swarm_cluster.registry}/kiln",
        RegistryOptions(ca_file=swarm_cluster.registry_ca),
    )
    node_apis = {node.address: node.api(timeout=60) for node in swarm_cluster.nodes}
    targets = HostTargets.create(base)
    specs: dict[Any, InstanceSpec] = {"other": other_spec(image, targets)}
    for key, user in USERS.items():
        specs[key] = probe_spec(image, f"probe-{key}", user, service=f"probe-{key}")
    for attack, key in SANDBOXES:
        name = _sandbox_name(attack, key)
        specs[(attack.name, key)] = probe_spec(
            image, name, USERS[key], service=name, **_sandbox_overrides(attack)
        )
    started: dict[Any, Probe] = {}
    try:
        with (
            hostside.unix_listener(str(home / "agent.sock")),
            hostside.unix_listener("\0" + targets.abstract_name),
        ):
            # The first start pushes the image; the others then only pull it.
            started["other"] = Probe(runtime, runtime.start(specs.pop("other")), None)
            with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
                futures = {k: pool.submit(runtime.start, s) for k, s in specs.items()}
            for k, future in futures.items():
                started[k] = Probe(runtime, future.result(), specs[k].user)
            for running in started.values():
                running.wait_ready(timeout=30)
            yield Lab(
                **targets.targets(),
                cluster=swarm_cluster,
                home=home,
                image=image,
                runtime=runtime,
                node_apis=node_apis,
                other=started["other"],
                clock_offset=time.time() - time.monotonic(),
                probes={key: started[key] for key in USERS},
                sandboxes={k: v for k, v in started.items() if isinstance(k, tuple)},
            )
    finally:
        with concurrent.futures.ThreadPoolExecutor(len(specs) + 1) as pool:
            list(pool.map(runtime.destroy, runtime.list()))
        for instance_id in runtime.leftovers():
            runtime.release(instance_id)
        runtime.shutdown()
        runtime.close()
        _assert_nothing_of_the_home_left(swarm_cluster, runtime.tag)
        for api in node_apis.values():
            api.close()
        targets.close()
        shutil.rmtree(home / "logs", ignore_errors=True)


def _assert_nothing_of_the_home_left(cluster: SwarmCluster, tag: str) -> None:
    """No service, secret or network of the home stays in the swarm."""
    api = cluster.manager.api()
    try:
        label = {"label": f"dev.kiln.home={tag}"}
        deadline = time.monotonic() + 30
        while True:
            left = [
                *(s["Spec"]["Name"] for s in api.services(filters=label)),
                *(s["Spec"]["Name"] for s in api.secrets(filters=label)),
                *(n["Name"] for n in api.networks(filters=label)),
            ]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, f"left in the swarm: {left}"
    finally:
        api.close()


@pytest.fixture(scope="module", params=list(USERS))
def probe(request: pytest.FixtureRequest, lab: Lab) -> Probe:
    """The module's probe instance for one user."""
    return lab.probes[str(request.param)]


def _key(probe: Probe) -> str:
    return next(k for k, v in USERS.items() if v == probe.user)


def host_for(lab: Lab, probe: Probe, key: str) -> Host:
    """Variables and host observations for attacks from ``probe``."""
    # This machine as the nodes see it: the bridge their namespaces hang off.
    gateway = lab.cluster.gateway
    variables = attack_variables(
        lab.home, lab, lab.other, gateway, DEFAULT_TMPFS_SIZE // 2**20 + 64
    )
    container = lab.container(probe)
    data = container["GraphDriver"]["Data"]
    layers = [Path(p) for p in [*data["LowerDir"].split(":"), data["UpperDir"]]]
    node_api = lab.node_api(probe)

    def exec_during() -> None:
        """``docker exec`` on the task's node (Kiln has no exec on Swarm; an operator does)."""
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            created = node_api.exec_create(container["Id"], ["/bin/sh", "-c", "sleep 0.05"])
            node_api.exec_start(created["Id"])

    log = lab.log(probe)
    observations = host_observations(
        lab, lab.other, probe, layers, int(variables["bind_port"]), log, lab.clock_offset
    )

    return Host(
        kind=f"swarm runtime ({key})",
        variables=variables,
        observations=observations,
        monitors=follower_monitors(log),
        actions={"exec_during": exec_during},
        sandboxes={"own", "pids", "memory"},
        secret_names={"host_shadow_line", "host_marker", "other_secret"},
    )


def test_the_attacks_that_do_not_apply_are_those_of_image_devices_and_volumes() -> None:
    carried = {a.name for a in iter_attacks(INSTANCE) if "image_devices" in a.needs}
    volumes = {a.name for a in iter_attacks(INSTANCE) if "{volume}" in a.command}
    assert set(NOT_APPLICABLE) == carried | volumes
    assert set(SWARM_DIFFERENCES) <= {a.name for a in SHARED}


# -- controls: the probe can do what an app may, so a blocked attack means something


def test_control_the_probe_runs_commands_as_its_user_on_a_node(probe: Probe, lab: Lab) -> None:
    assert probe.address in {node.address for node in lab.cluster.nodes}
    outcome = probe.send("id -u; echo hi > /tmp/ok && cat /tmp/ok")
    assert outcome.exit_code == 0, outcome
    assert outcome.output.split() == [str(uid(probe.user)), "hi"]


def test_control_the_other_instance_answers_and_its_secret_is_there(lab: Lab) -> None:
    with HTTP.open(lab.other.url("/index.html"), timeout=5) as response:
        assert response.read().decode().strip() == lab.other_banner
    api = lab.node_api(lab.other)
    created = api.exec_create(
        lab.container(lab.other)["Id"], ["cat", f"/run/secrets/{lab.other_secret_name}"]
    )
    assert api.exec_start(created["Id"]).decode() == lab.other_secret
    assert lab.other_log_marker in lab.log(lab.other).read_text()


def test_swarm_refuses_a_volume(lab: Lab) -> None:
    """A named volume lives on one node and the task may move: refused before anything."""
    spec = lab.spec("with-volume", None, volumes=(VolumeMount("data", "/data"),))
    with pytest.raises(RuntimeFailure, match="the swarm runtime has no volumes"):
        lab.runtime.start(spec)
    assert "with-volume" not in lab.runtime.leftovers()
    assert lab.runtime.capabilities.volumes is False


def test_log_lines_are_cut_at_exactly_64_kib(probe: Probe, lab: Lab) -> None:
    assert_log_lines_cut_at(probe, lab.log(probe), MAX_LINE, timeout=15)


# -- the attacks


@pytest.mark.parametrize("attack", SHARED, ids=attack_id)
def test_escape(attack: Attack, probe: Probe, lab: Lab) -> None:
    key = _key(probe)
    skip_if_differs(SWARM_DIFFERENCES, attack, key, "Swarm")
    run_attack(attack, host_for(lab, probe, key), probe.send)
    assert probe.alive(), "the probe died under the attack"


@pytest.mark.parametrize(
    ("attack", "key"), SANDBOXES, ids=[f"{key}-{a.name}" for a, key in SANDBOXES]
)
def test_escape_in_its_own_sandbox(attack: Attack, key: str, lab: Lab) -> None:
    own = lab.sandboxes[(attack.name, key)]
    own_host = sandbox_host(
        host_for(lab, own, key),
        attack,
        lambda: str(lab.container(own)["Id"]),
        lambda: lab.host_pid(own),
        lambda: lab.other.alive() and lab.probes[key].alive(),
    )
    run_attack(attack, own_host, own.send)
    if attack.sandbox == "memory":
        container_id = lab.container(own)["Id"]
        state = lab.runtime.stop(own.handle, 0.0)
        # The difference: the node's engine saw the OOM kill, Swarm's task status does not
        # carry it (if Kiln learns to see it, assert state.oom_killed here).
        assert lab.node_api(own).inspect_container(container_id)["State"]["OOMKilled"] is True
        assert state.oom_killed is False, state


# -- where Swarm's model differs: what it gives instead


def _status(pid: str | int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


_ZERO = "0000000000000000"
_CAPS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def test_swarm_difference_no_no_new_privileges_but_no_capability_either(
    probe: Probe, lab: Lab
) -> None:
    """Swarm's service API has no no-new-privileges: what confines the task instead."""
    expected = str(uid(probe.user))
    outside = _status(lab.host_pid(probe))
    assert outside["Uid"].split() == [expected] * 4  # no remapping, as on Docker
    inside = probe.send(
        "grep -E '^(Uid|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status; "
        "touch /was-here 2>&1"
    )
    fields = status_fields(inside.output)
    assert fields["Uid"].split() == [expected] * 4
    for name in _CAPS:
        assert fields[name] == _ZERO, (name, fields[name])
    # The difference: no no-new-privileges; Docker's default seccomp profile (mode 2).
    assert (fields["NoNewPrivs"], fields["Seccomp"]) == ("0", "2")
    assert "Read-only file system" in inside.output
    host_config = lab.container(probe)["HostConfig"]
    assert "ALL" in (host_config["CapDrop"] or []) and host_config["ReadonlyRootfs"] is True


def test_swarm_difference_a_setuid_root_file_gives_the_user_euid_0_without_a_capability(
    probe: Probe, lab: Lab
) -> None:
    if probe.user is None:
        pytest.skip("about the image user")
    outcome = probe.send(
        "rm -f /tmp/pw; mkfifo /tmp/pw\n"
        "/suid/su root < /tmp/pw > /dev/null 2>&1 & p=$!\n"
        "exec 3> /tmp/pw; sleep 0.5\n"
        "grep -E '^(Uid|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/$p/status\n"
        "kill $p"
    )
    fields = status_fields(outcome.output)
    # The difference: Kiln's layers keep setuid bits and nothing stops them on Swarm, so
    # the setuid-root su runs with euid 0 (real uid the image user's)...
    assert fields["Uid"].split() == ["65534", "0", "0", "0"], outcome.output
    assert fields["NoNewPrivs"] == "0"
    # ...and with no capability at all (the bounding set is empty, so a setuid-root
    # exec gains none) under Docker's seccomp profile: root inside's position.
    for name in _CAPS:
        assert fields[name] == _ZERO, (name, fields[name])
    assert fields["Seccomp"] == "2"


def test_swarm_difference_root_inside_writes_its_own_dev_but_not_the_init(
    probe: Probe, lab: Lab
) -> None:
    if probe.user is not None:
        pytest.skip("about root inside")
    # The difference, as on Docker: /dev is a tmpfs of the task's own, writable by its root.
    assert_root_inside_writes_its_own_dev_but_not_the_init(probe)


def test_swarm_difference_private_is_not_enforced_the_hosts_addresses_answer(
    probe: Probe, lab: Lab
) -> None:
    gateway = lab.cluster.gateway
    # The difference (documented): what listens on every address of the machine the
    # nodes run on answers an instance, over TCP and UDP.
    outcome = assert_host_services_answer_but_not_its_loopback(
        probe, lab, gateway, also="ip -4 -o addr; "
    )
    # What stays out of reach: this machine's loopback. The task's namespace is its
    # own, behind its node's: none of its addresses is the test's or the node's.
    assert lab.loopback.banner not in outcome.output
    addresses = set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", outcome.output))
    assert addresses and "127.0.0.1" in addresses
    assert not addresses & {gateway, *(node.address for node in lab.cluster.nodes)}


def test_swarm_difference_instances_reach_each_other_on_the_overlay_and_published_ports(
    probe: Probe, lab: Lab
) -> None:
    overlay = lab.runtime.api.inspect_network(lab.runtime.network_name())
    other_task = lab.container(lab.other)["NetworkSettings"]["Networks"][overlay["Name"]]
    request = "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {} {}"
    published = probe.send(request.format(lab.other.address, lab.other.port))
    on_overlay = probe.send(request.format(other_task["IPAddress"], 8080))
    # The difference: the published port is there for the proxies and the health checks,
    # and it answers every instance too; so does the other task on the shared overlay.
    assert lab.other_banner in published.output, published
    assert lab.other_banner in on_overlay.output, on_overlay
    # Why (documented): an overlay marked internal cannot publish host ports.
    assert overlay["Driver"] == "overlay" and overlay["Internal"] is False
