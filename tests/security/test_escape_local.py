"""The escape suite against the local runtime: every attack of ``probe.ATTACKS``
from inside a real runc instance, as the image user (65534) and as root inside.

One probe instance per user serves the whole module (its app runs what each
test POSTs); attacks that kill or exhaust their sandbox get their own
(``Attack.sandbox``: ``own``, ``pids``, ``memory``). The host side is real:
TCP servers on the host's loopback and on every address, a stand-in for the
agent's socket, an abstract socket, a host ``sleep`` to signal, a host file
in a volume, another instance with a secret and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostside
import pytest
from probe import (
    AFTER_IMAGE_TRICK,
    IMAGE_TRICKS,
    INSTANCE,
    MALICIOUS_WORKDIRS,
    WORKDIR_ESCAPE,
    Attack,
    Host,
    Outcome,
    attack_named,
    build_probe_tree,
    build_trick_layer,
    execute,
    file_state,
    finish_probe_tree,
    foreign_entries,
    iter_attacks,
    parse_cgi,
    remove_device_nodes,
    tree_fingerprint,
)

from busybox_tree import BUSYBOX
from kiln.observe.logs import LogStore
from kiln.oci.idmap import IdRange, id_range
from kiln.oci.network import BridgeNetwork
from kiln.oci.runc import RUN_ROOT, home_tag
from kiln.runtime import (
    InstanceHandle,
    InstanceSpec,
    InstanceStatus,
    RuntimeFailure,
    VolumeMount,
)
from kiln.runtime.local import INIT_BINARY, LocalRuntime
from kiln.runtime.shim import MAX_LINE, memory_cgroup_dir

pytestmark = [
    pytest.mark.serial,  # the host's process count is watched: nothing else may run
    pytest.mark.skipif(os.geteuid() != 0, reason="runc instances need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed"),
]

USERS = {"image-user": "65534:65534", "root-inside": None}
APP_PORT = 8080
PIDS_LIMIT = 64
MEMORY_LIMIT_MB = 64
RACE_SECONDS = 3
FLOOD_BYTES = 100_000_000
DIGEST = "sha256:" + "5e" * 32


# -- the probe instance


class _NoProxy(urllib.request.ProxyHandler):
    def __init__(self) -> None:
        super().__init__({})


_HTTP = urllib.request.build_opener(_NoProxy)


@dataclass
class Probe:
    runtime: LocalRuntime
    handle: InstanceHandle
    user: str | None

    @property
    def address(self) -> str:
        return self.handle.host

    def url(self, path: str) -> str:
        return f"http://{self.address}:{APP_PORT}{path}"

    def send(self, command: str, timeout: float = 30.0) -> Outcome:
        request = urllib.request.Request(
            self.url("/cgi-bin/run"), data=command.encode(), method="POST"
        )
        try:
            with _HTTP.open(request, timeout=timeout) as response:
                body = response.read().decode("utf-8", errors="replace")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            return Outcome(-1, f"no answer from the probe: {e!r}")
        return parse_cgi(body)

    def wait_ready(self, timeout: float = 15.0, *, diagnose: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with _HTTP.open(self.url("/index.html"), timeout=2) as response:
                    response.read()
                    return
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    state = self.runtime.inspect(self.handle)
                    log = Path(self.handle.data["dir"], "shim.log")
                    shim_log = log.read_text() if log.exists() else ""
                    detail = self.diagnose() if diagnose else ""
                    raise AssertionError(
                        f"probe not ready: {state}\n{shim_log}\n{detail}"
                    ) from None
                time.sleep(0.05)

    def diagnose(self) -> str:
        """What the host and the sandbox see of the probe's network, for a failure message."""
        inside = self.runtime.exec(self.handle, ["sh", "-c", "ip addr; netstat -ltn"], 10)
        bridge = BridgeNetwork(self.runtime.home).bridge
        neigh = subprocess.run(["ip", "neigh", "show", "dev", bridge], capture_output=True)
        links = subprocess.run(["ip", "-br", "link"], capture_output=True)
        return (
            f"inside: {inside}\nhost neighbours: {neigh.stdout.decode()}"
            f"\nhost links: {links.stdout.decode()}"
        )

    def alive(self) -> bool:
        return self.runtime.inspect(self.handle).status is InstanceStatus.RUNNING

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.runtime.stop(self.handle, 0.0)
        self.runtime.destroy(self.handle)


# -- the module's lab: home, image, runtime, host targets, another instance


@dataclass
class Lab:
    home: Path
    ids: IdRange
    layer: Path
    runtime: LocalRuntime
    marker_path: Path
    marker: str
    sleep: hostside.HostSleep
    loopback: hostside.BannerServer
    anywhere: hostside.BannerServer
    udp: hostside.DatagramCounter
    abstract_name: str
    other: Probe
    other_secret_name: str
    other_secret: str
    other_log_marker: str
    other_banner: str
    clock_offset: float
    fingerprints: dict[str, str] = field(default_factory=dict)
    probes: dict[str, Probe] = field(default_factory=dict)

    def start(self, name: str, user: str | None, **overrides: Any) -> Probe:
        command = overrides.pop("command", ["httpd", "-f", "-p", str(APP_PORT), "-h", "/www"])
        env = {"PATH": "/bin", "PORT": str(APP_PORT), **overrides.pop("env", {})}
        spec = InstanceSpec(
            instance_id=name,
            service=overrides.pop("service", "probe"),
            revision=1,
            image_digest=DIGEST,
            layers=(self.layer,),
            command=command,
            user=user,
            workdir="/",
            env=env,
            port=APP_PORT,
            stop_grace=1.0,
            **overrides,
        )
        return Probe(self.runtime, self.runtime.start(spec), user)

    def volume_dir(self, user_key: str) -> Path:
        return self.home / "volumes" / f"data-{user_key}"


def _uid(user: str | None) -> int:
    return int(user.split(":")[0]) if user else 0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("escape-local")
    home = base / "home"
    home.mkdir(mode=0o700)
    ids = id_range(home)
    layer = build_probe_tree(base / "layer")
    finish_probe_tree(layer, ids.base, ids.base)
    runtime = LocalRuntime(home)
    marker = hostside.token("host-marker-content")
    marker_path = base / hostside.token("host-marker")
    marker_path.write_text(marker + "\n")
    marker_path.chmod(0o600)
    sleep = hostside.HostSleep()
    loopback = hostside.BannerServer("127.0.0.1", hostside.token("loopback-banner"))
    anywhere = hostside.BannerServer("0.0.0.0", hostside.token("anywhere-banner"))
    udp = hostside.DatagramCounter("0.0.0.0")
    abstract_name = hostside.token("kiln-escape-abstract")
    secret_name = hostside.token("dbpass").replace("-", "_")
    secret = hostside.token("s3cr3t")
    log_marker = hostside.token("other-log-line")
    banner = hostside.token("other-banner")
    started: list[Probe] = []
    try:
        with (
            hostside.unix_listener(str(home / "agent.sock")),
            hostside.unix_listener("\0" + abstract_name),
        ):
            other = Probe(
                runtime,
                runtime.start(
                    InstanceSpec(
                        instance_id="other",
                        service="other",
                        revision=1,
                        image_digest=DIGEST,
                        layers=(layer,),
                        command=[
                            "sh",
                            "-c",
                            'echo "$LOG_MARKER"; mkdir /tmp/www; echo "$BANNER" > '
                            "/tmp/www/index.html; exec httpd -f -p $PORT -h /tmp/www",
                        ],
                        user=None,
                        workdir="/",
                        env={
                            "PATH": "/bin",
                            "PORT": str(APP_PORT),
                            "LOG_MARKER": log_marker,
                            "BANNER": banner,
                        },
                        port=APP_PORT,
                        secrets={secret_name: secret.encode()},
                        stop_grace=1.0,
                    )
                ),
                None,
            )
            started.append(other)
            other.wait_ready()
            yield Lab(
                home=home,
                ids=ids,
                layer=layer,
                runtime=runtime,
                marker_path=marker_path,
                marker=marker,
                sleep=sleep,
                loopback=loopback,
                anywhere=anywhere,
                udp=udp,
                abstract_name=abstract_name,
                other=other,
                other_secret_name=secret_name,
                other_secret=secret,
                other_log_marker=log_marker,
                other_banner=banner,
                clock_offset=time.time() - time.monotonic(),
                fingerprints={
                    "runc": hostside.sha256_file(Path(shutil.which("runc") or "/usr/sbin/runc")),
                    "init": hostside.sha256_file(INIT_BINARY),
                },
            )
    finally:
        for probe in started:
            with contextlib.suppress(Exception):
                probe.stop()
        for directory in runtime.instances_dir.glob("*") if runtime.instances_dir.is_dir() else ():
            handle = runtime.handle_for(directory.name)
            if handle is not None:
                with contextlib.suppress(Exception):
                    runtime.stop(handle, 0.0)
                    runtime.destroy(handle)
        runtime.shutdown()
        if not runtime.list():
            shutil.rmtree(RUN_ROOT / home_tag(home), ignore_errors=True)
        sleep.close()
        loopback.close()
        anywhere.close()
        udp.close()
        remove_device_nodes(layer)
        shutil.rmtree(home / "logs", ignore_errors=True)


@pytest.fixture(scope="module", params=list(USERS))
def probe(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Probe]:
    """The module's probe instance for one user, with a volume holding a host-root file."""
    key = str(request.param)
    user = USERS[key]
    volume = lab.volume_dir(key)
    volume.mkdir(parents=True, mode=0o755)
    os.chown(volume, lab.ids.to_host(_uid(user)), lab.ids.to_host(_uid(user)))
    hostfile = volume / "hostfile"
    hostfile.write_text("owned by host root\n")
    hostfile.chmod(0o644)
    started = lab.start(
        f"probe-{key}", user, volumes=(VolumeMount(volume.name, "/data"),), service=f"probe-{key}"
    )
    try:
        started.wait_ready()
        lab.probes[key] = started
        yield started
    finally:
        lab.probes.pop(key, None)
        started.stop()


def host_for(lab: Lab, probe: Probe, key: str) -> Host:
    """Variables and host observations for attacks from ``probe``."""
    runtime = lab.runtime
    shim_pid = int(probe.handle.data["shim_pid"])
    gateway = BridgeNetwork(lab.home).gateway()
    volume = lab.volume_dir(key)
    shadow = hostside.shadow_first_line()
    variables = {
        "home": str(lab.home),
        "home_b64": hostside.b64(str(lab.home)),
        "host_marker_path": str(lab.marker_path),
        "host_marker_name": lab.marker_path.name,
        "host_marker": lab.marker,
        "host_shadow_line": shadow,
        "host_pid": str(lab.sleep.pid),
        "host_sleep_marker": lab.sleep.marker,
        "host_sleep_marker_b64": hostside.b64(lab.sleep.marker),
        "gateway": gateway,
        "loopback_port": str(lab.loopback.port),
        "loopback_banner": lab.loopback.banner,
        "any_port": str(lab.anywhere.port),
        "any_banner": lab.anywhere.banner,
        "udp_port": str(lab.udp.port),
        "host_addresses": " ".join(hostside.host_addresses()),
        "abstract_socket": lab.abstract_name,
        "bind_port": str(hostside.free_port()),
        "other_address": lab.other.address,
        "other_port": str(APP_PORT),
        "other_banner": lab.other_banner,
        "other_secret": lab.other_secret,
        "other_secret_name": lab.other_secret_name,
        "other_log_marker": lab.other_log_marker,
        "volume": "/data",
        "image_devices": "1",
        "tmp_fill_mb": str(512 + 64),
        "flood_bytes": str(FLOOD_BYTES),
        "log_growth_limit_mb": str(FLOOD_BYTES * 1.1 / 2**20 + 1),
        "shim_rss_limit_mb": f"{hostside.peak_rss_mb(shim_pid) + 64:.0f}",
        "race_seconds": str(RACE_SECONDS),
        "pids_limit": str(PIDS_LIMIT),
        "hold_count": str(PIDS_LIMIT + 50),
        "hold_seconds": "120",
        "bomb_seconds": "2",
        "host_process_rise_limit": str(PIDS_LIMIT + 100),
        "hog_mb": "256",
        "memory_limit_mb": str(MEMORY_LIMIT_MB),
    }
    runc_path = Path(shutil.which("runc") or "/usr/sbin/runc")

    def exec_during() -> None:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            runtime.exec(probe.handle, ["/bin/sh", "-c", "sleep 0.05"], 10)

    bind_port = int(variables["bind_port"])
    observations: dict[str, Callable[[], object]] = {
        "core_pattern": lambda: Path("/proc/sys/kernel/core_pattern").read_text(),
        "sysctl_fingerprint": hostside.sysctl_fingerprint,
        "modules": hostside.loaded_modules,
        "hostname": lambda: Path("/proc/sys/kernel/hostname").read_text(),
        "clock": lambda: abs(time.time() - time.monotonic() - lab.clock_offset) < 60,
        "host_sleep_alive": lab.sleep.alive,
        "other_sandbox_alive": lambda: lab.other.alive() and probe.alive(),
        "layer": lambda: tree_fingerprint(lab.layer),
        "runc_binary": lambda: hostside.sha256_file(runc_path),
        "init_binary": lambda: hostside.sha256_file(INIT_BINARY),
        "volume_hostfile": lambda: file_state(volume / "hostfile"),
        "volume_foreign": lambda: foreign_entries(
            volume, lab.ids.base, lab.ids.base + lab.ids.size
        ),
        "loopback_accepts": lambda: lab.loopback.accepted,
        "any_accepts": lambda: lab.anywhere.accepted,
        "udp_datagrams": lambda: lab.udp.received,
        "host_listener_on_bind_port": lambda: hostside.host_listener_on(bind_port),
        "shim_alive": lambda: runtime.recover(probe.handle),
    }

    def shim_peak() -> Callable[[], float]:
        return lambda: hostside.peak_rss_mb(shim_pid)

    log = lab.home / "logs" / f"probe-{key}" / f"probe-{key}.log"

    def log_growth() -> Callable[[], float]:
        start = log.stat().st_size
        return lambda: (log.stat().st_size - start) / 2**20

    return Host(
        kind=f"local runtime ({key})",
        variables=variables,
        observations=observations,
        monitors={"shim_peak_rss_mb": shim_peak, "instance_log_growth_mb": log_growth},
        actions={"exec_during": exec_during},
        sandboxes={"own", "pids", "memory"},
        secret_names={"host_shadow_line", "host_marker", "other_secret"},
    )


def _id(attack: Attack) -> str:
    return attack.name


SHARED = [a for a in iter_attacks(INSTANCE) if a.sandbox is None]
DEDICATED = [a for a in iter_attacks(INSTANCE) if a.sandbox is not None]


# -- controls: the probe can do what an app may, so a blocked attack means something


def test_control_the_probe_runs_commands_as_its_user(probe: Probe) -> None:
    outcome = probe.send("id -u; echo hi > /tmp/ok && cat /tmp/ok; touch /data/mine && echo vol")
    assert outcome.exit_code == 0, outcome
    assert outcome.output.split() == [str(_uid(probe.user)), "hi", "vol"]


def test_control_a_published_port_is_reachable_and_unpublishing_closes_it(
    probe: Probe, lab: Lab
) -> None:
    gateway = BridgeNetwork(lab.home).gateway()
    command = f"nc -w 2 {gateway} {lab.anywhere.port} < /dev/null"
    lab.runtime.publish_ports({lab.anywhere.port})
    try:
        reached = probe.send(command)
    finally:
        lab.runtime.publish_ports(set())
    assert lab.anywhere.banner in reached.output, reached
    blocked = probe.send(command)
    assert lab.anywhere.banner not in blocked.output, blocked


def test_control_the_host_reaches_the_other_instance_and_its_secret_is_there(lab: Lab) -> None:
    with _HTTP.open(lab.other.url("/index.html"), timeout=5) as response:
        assert response.read().decode().strip() == lab.other_banner
    code, out = lab.runtime.exec(
        lab.other.handle, ["cat", f"/run/secrets/{lab.other_secret_name}"], 10
    )
    assert (code, out) == (0, lab.other_secret)
    log = lab.home / "logs" / "other" / "other.log"
    assert lab.other_log_marker in log.read_text()


def _long_line_in_log(probe: Probe, lab: Lab) -> list[str]:
    """Write a marker and a 200 kB line to fd 9; the log's lines once both arrived."""
    mark = hostside.token("fd9")
    outcome = probe.send(f"echo {mark} >&9; head -c 200000 /dev/zero | tr '\\0' B >&9; echo >&9")
    assert outcome.exit_code == 0, outcome
    log = lab.home / "logs" / f"probe-{_key(probe)}" / f"probe-{_key(probe)}.log"
    deadline = time.monotonic() + 5
    while True:
        # The shim may be mid-way through a record: only lines it ended are read.
        complete = log.read_text().split("\n")[:-1]
        records = [json.loads(line) for line in complete if line]
        lines = [r["line"] for r in records]
        after = lines[lines.index(mark) + 1 :] if mark in lines else []
        if sum(len(x) for x in after if x.startswith("B")) >= 200000:
            return after
        assert time.monotonic() < deadline, lines[-5:]
        time.sleep(0.05)


def test_control_fd_9_is_the_instance_log_and_long_lines_are_cut(probe: Probe, lab: Lab) -> None:
    lines = _long_line_in_log(probe, lab)
    # The shim reads 64 KiB at a time: a line is cut to at most MAX_LINE + one read.
    assert max(len(x) for x in lines) < MAX_LINE + 65536


def test_log_lines_are_cut_at_exactly_64_kib(probe: Probe, lab: Lab) -> None:
    mark = hostside.token("cut")
    command = (
        f"echo {mark} >&9; head -c 65535 /dev/zero | tr '\\0' C >&9; sleep 0.3; "
        "printf 'CCCCCCCCCC\\n' >&9"
    )
    assert probe.send(command).exit_code == 0
    log = lab.home / "logs" / f"probe-{_key(probe)}" / f"probe-{_key(probe)}.log"
    deadline = time.monotonic() + 5
    while True:
        text = log.read_text()
        complete = text[: text.rfind("\n") + 1]  # the shim may be mid-write of a long line
        lines = [json.loads(x)["line"] for x in complete.splitlines() if x]
        after = lines[lines.index(mark) + 1 :] if mark in lines else []
        if sum(len(x) for x in after) >= 65545:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert max(len(x) for x in after) <= MAX_LINE


def _key(probe: Probe) -> str:
    return next(k for k, v in USERS.items() if v == probe.user)


# -- the attacks


@pytest.mark.parametrize("attack", SHARED, ids=_id)
def test_escape(attack: Attack, probe: Probe, lab: Lab) -> None:
    host = host_for(lab, probe, _key(probe))
    assert not host.missing(attack), f"the local runner lacks {host.missing(attack)}"
    outcome = execute(attack, host, probe.send)
    print(f"{attack.name}: blocked, exit {outcome.exit_code}, measured {outcome.measured}")
    print(outcome.output[-1500:])
    assert probe.alive(), "the probe died under the attack"


@pytest.mark.parametrize("attack", DEDICATED, ids=_id)
def test_escape_in_its_own_sandbox(attack: Attack, probe: Probe, lab: Lab) -> None:
    key = _key(probe)
    host = host_for(lab, probe, key)
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
        sandbox_pid = int(own.handle.data["sandbox_pid"])
        monitors = dict(host.monitors)
        if attack.sandbox == "pids":
            container = lab.runtime.container_id(own.handle.instance_id)
            monitors["host_process_rise"] = lambda: hostside.ProcessSampler().rise
            monitors["sandbox_pids_peak"] = lambda: hostside.ProcessSampler(container).sandbox_peak
        if attack.sandbox == "memory":
            memory_dir = memory_cgroup_dir(sandbox_pid)
            assert memory_dir is not None

            def memory_peak() -> Callable[[], float]:
                return lambda: int((memory_dir / "memory.max_usage_in_bytes").read_text()) / 2**20

            monitors["memory_peak_mb"] = memory_peak
        observations = dict(host.observations)
        observations["other_sandbox_alive"] = lambda: lab.other.alive() and probe.alive()
        own_host = dataclasses.replace(host, monitors=monitors, observations=observations)
        assert not own_host.missing(attack), f"the local runner lacks {own_host.missing(attack)}"
        outcome = execute(attack, own_host, own.send)
        print(f"{attack.name}: blocked, exit {outcome.exit_code}, measured {outcome.measured}")
        print(outcome.output[-1500:])
        if attack.sandbox == "memory":
            own.runtime.stop(own.handle, 0.0)
            state = own.runtime.inspect(own.handle)
            assert state.oom_killed, f"the OOM kill was not recorded: {state}"
    finally:
        own.stop()


def test_an_instance_reusing_a_freed_address_is_not_shadowed_by_a_stale_neighbour(
    lab: Lab,
) -> None:
    # Found by this suite: a reused address kept the old veth's MAC in the host's
    # neighbour table. The bridge now has a fixed MAC (as docker0) and leases flush it.
    bridge = BridgeNetwork(lab.home).bridge
    first = Probe(lab.runtime, lab.runtime.start(_spec_for(lab, "reuse-a")), None)
    try:
        first.wait_ready()
    finally:
        first.stop()
    second = Probe(lab.runtime, lab.runtime.start(_spec_for(lab, "reuse-b")), None)
    try:
        assert second.address == first.address
        code, mac = lab.runtime.exec(second.handle, ["cat", "/sys/class/net/eth0/address"], 10)
        assert code == 0, mac
        shown = subprocess.run(
            ["ip", "-j", "neigh", "show", second.address, "dev", bridge],
            capture_output=True,
            text=True,
            check=True,
        )
        entries = [e for e in json.loads(shown.stdout or "[]") if "lladdr" in e]
        assert all(e["lladdr"] == mac.strip() for e in entries), (entries, mac)
    finally:
        second.stop()


def _spec_for(lab: Lab, name: str) -> InstanceSpec:
    return InstanceSpec(
        instance_id=name,
        service=name,
        revision=1,
        image_digest=DIGEST,
        layers=(lab.layer,),
        command=["httpd", "-f", "-p", str(APP_PORT), "-h", "/www"],
        user=None,
        workdir="/",
        env={"PATH": "/bin"},
        port=APP_PORT,
        stop_grace=1.0,
    )


def test_an_app_past_its_memory_limit_is_oom_killed_and_recorded(lab: Lab) -> None:
    hog = lab.start(
        "hog",
        None,
        command=["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
        memory=32 * 1024 * 1024,
    )
    try:
        state = lab.runtime.wait(hog.handle, 20)
        assert state.status is InstanceStatus.EXITED, state
        assert state.oom_killed, state
        assert state.exit_code == 137, state
    finally:
        hog.stop()


def test_an_exec_runs_as_confined_as_the_app(probe: Probe, lab: Lab) -> None:
    """``runc exec`` (exec health checks) gets the app's user, caps, seccomp and nnp."""
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
    spec = dataclasses.replace(
        _spec_for(lab, name), command=["sh", "-c", command], workdir=workdir, user=None
    )
    try:
        handle = lab.runtime.start(spec)
    except RuntimeFailure as e:
        print(f"{workdir}: refused at start: {e}")
        return
    try:
        state = lab.runtime.wait(handle, 15)
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
    evil = build_trick_layer(tmp_path / "evil", IMAGE_TRICKS[trick], lab.ids.base, lab.ids.base)
    name = "trick-" + trick.replace("_", "-")[:40]
    spec = dataclasses.replace(
        _spec_for(lab, name),
        layers=(lab.layer, evil),
        volumes=(VolumeMount(name, "/data"),),
        secrets={"token": b"not-a-real-secret"},
    )
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    try:
        handle = lab.runtime.start(spec)
    except RuntimeFailure as e:
        print(f"{trick}: refused at start: {e}")
        assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
        return
    tricked = Probe(lab.runtime, handle, None)
    try:
        try:
            tricked.wait_ready(timeout=5, diagnose=False)
        except AssertionError:
            state = lab.runtime.inspect(handle)
            print(f"{trick}: started but does not serve: {state}")
            return
        host = host_for(lab, tricked, "image-user")
        for attack_name in AFTER_IMAGE_TRICK:
            outcome = execute(attack_named(attack_name), host, tricked.send)
            print(f"{trick} / {attack_name}: blocked, exit {outcome.exit_code}")
    finally:
        tricked.stop()
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
