"""What the local runtime holds besides its instances (bridge, rules, runc state), how the
agent frees a dead instance's remains, and how ``kiln down`` frees the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from runtime_contract import AppSpec, http_get

from kiln.oci.network import BridgeNetwork
from kiln.oci.runc import RUN_ROOT, home_tag
from kiln.process import proc_start_time
from kiln.runtime import HostResources, InstanceStatus
from kiln.runtime.local import LocalRuntime
from leftovers import assert_nothing_left, leftovers, veth_name


def nft_tables() -> list[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()]


def test_the_local_runtime_offers_host_resources(local_runtime: LocalRuntime) -> None:
    assert isinstance(local_runtime, HostResources)


def test_an_exited_instance_is_a_leftover_until_released_and_its_logs_stay(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    spec = make_spec(["sh", "-c", "echo bye"])
    handle = local_runtime.start(spec)
    assert local_runtime.wait(handle, 10).exit_code == 0
    assert local_runtime.leftovers() == [spec.instance_id]
    local_runtime.release(spec.instance_id)
    assert local_runtime.leftovers() == []
    assert not (home / "instances" / spec.instance_id).exists()
    local_runtime.release(spec.instance_id)
    logs = home / "logs" / "web"
    assert any(p.name.startswith(spec.instance_id) for p in logs.iterdir())


def test_release_frees_a_container_whose_shim_was_killed(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    """A shim killed with -9 cannot clean up: its container still runs, owned by nobody.
    ``leftovers`` finds it and ``release`` frees the container, cgroups, lease and dir."""
    spec = make_spec(["sleep", "30"])
    handle = local_runtime.start(spec)
    sandbox_pid = int(handle.data["sandbox_pid"])
    os.kill(int(handle.data["shim_pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while proc_start_time(int(handle.data["shim_pid"])) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    container = local_runtime.container_id(spec.instance_id)
    assert [c["id"] for c in local_runtime.runc.list()] == [container]
    assert proc_start_time(sandbox_pid) is not None
    assert local_runtime.list() == []
    assert local_runtime.inspect(handle).status is InstanceStatus.GONE
    assert local_runtime.leftovers() == [spec.instance_id]

    local_runtime.release(spec.instance_id)
    assert local_runtime.leftovers() == []
    assert local_runtime.runc.list() == []
    assert proc_start_time(sandbox_pid) is None
    assert spec.instance_id not in BridgeNetwork(home).leases()
    assert not Path(f"/sys/class/net/{veth_name(home, spec.instance_id)}").exists()
    assert not (home / "instances" / spec.instance_id).exists()
    assert not local_runtime.view_dir(spec.instance_id).exists()
    held = leftovers(home)
    assert not any(container in what for what in held), held


def test_shutdown_does_nothing_while_an_instance_runs(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    spec = make_spec(["sh", "-c", "exec httpd -f -p $PORT -h /www"])
    handle = local_runtime.start(spec)
    network = BridgeNetwork(home)
    local_runtime.shutdown()
    assert Path(f"/sys/class/net/{network.bridge}").exists()
    assert f"table inet {network.table}" in nft_tables()
    assert local_runtime.runc.root.is_dir()
    assert local_runtime.recover(handle)
    assert http_get(handle, spec.port) == b"hello from kiln\n"

    local_runtime.destroy(handle)
    local_runtime.shutdown()
    assert_nothing_left(home)
    local_runtime.shutdown()


def test_shutdown_of_a_home_that_never_started_anything(home: Path) -> None:
    LocalRuntime(home).shutdown()
    assert_nothing_left(home)


def test_the_leftover_check_sees_what_a_running_home_holds(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    """The checker that ends every test must not pass vacuously: pointed at a home
    that still runs, it names every kind of thing the home holds."""
    secret = b"a-value-only-this-test-knows"
    spec = make_spec(["sleep", "30"], secrets={"k": secret})
    local_runtime.start(spec)
    stray = home / "stray-copy"
    stray.write_bytes(b"prefix " + secret)
    mounted = home / "mnt"
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mounted)], check=True)
    try:
        held = leftovers(home, [secret])
    finally:
        subprocess.run(["umount", str(mounted)], check=True)
        stray.unlink()
    tag = home_tag(home)
    kinds = {
        "shim process": "shim process",
        "container process": f"in a kiln-{tag} cgroup",
        "runc container": f"runc container kiln-{tag}-{spec.instance_id}",
        "runtime dir": f"runtime dir {RUN_ROOT / tag}",
        "mount": f"mount {mounted} (tmpfs)",
        "cgroup": f"kiln-{tag}-{spec.instance_id}",
        "bridge": f"interface kiln-{tag}",
        "veth": f"interface {veth_name(home, spec.instance_id)}",
        "firewall": f"nftables table inet kiln_{tag}",
        "subnet": "subnet #",
        "secret copy": f"in {stray}",
    }
    missing = [kind for kind, text in kinds.items() if not any(text in h for h in held)]
    assert missing == [], held
