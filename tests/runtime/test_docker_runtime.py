"""What the Docker runtime does beyond the shared contract, against a private engine:
image delivery by digest, the container's confinement as the engine records it and
as the app sees it, secrets that never reach a disk, volumes, logs that survive an
agent restart, and a shared engine where only this home's containers are touched.
"""

# ruff: noqa: F811 - the docker_engine fixture is imported by name and used as a parameter
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest
from sandboxes import image_spec_factory

from busybox_tree import build_busybox_rootfs
from dockerd import (  # noqa: F401
    Dockerd,
    DockerdUnavailable,
    docker_engine,
    image_from_trees,
    start_dockerd,
    tear_down,
)
from kiln.errors import KilnError
from kiln.image.store import ImageStore
from kiln.observe.logs import LogStore
from kiln.oci.runc import RUN_ROOT
from kiln.runtime import (
    Execer,
    InstanceHandle,
    InstanceSpec,
    InstanceStatus,
    RuntimeFailure,
    Signaller,
    VolumeMount,
)
from kiln.runtime.docker import LABEL_HOME, LABEL_INSTANCE, MAX_LINE, DockerRuntime
from kiln.runtime.select import open_runtime
from leftovers import assert_nothing_left, files_containing

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the private engine and secrets need root"),
]

PORT = 8080
SECRET = b"s3cr3t-value-" + os.urandom(6).hex().encode()
Spec = Callable[..., InstanceSpec]
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def docker_home(
    tmp_path_factory: pytest.TempPathFactory, image_tree: Path, docker_engine: Dockerd
) -> Iterator[tuple[Path, str]]:
    """One home for the module: its networks are made once and removed at the end."""
    home = tmp_path_factory.mktemp("docker-runtime") / "home"
    home.mkdir(mode=0o700)
    yield home, image_from_trees(ImageStore(home / "images"), [image_tree])
    tear_down(DockerRuntime(home, docker_engine.host))
    assert_nothing_left(home, [SECRET])


@pytest.fixture
def runtime(docker_engine: Dockerd, docker_home: tuple[Path, str]) -> Iterator[DockerRuntime]:
    runtime = DockerRuntime(docker_home[0], docker_engine.host)
    yield runtime
    tear_down(runtime, keep_networks=True)
    assert_nothing_left(runtime.home, [SECRET])


@pytest.fixture
def api(docker_engine: Dockerd) -> Iterator[Any]:
    client = docker.APIClient(base_url=docker_engine.host, version="auto")
    yield client
    client.close()


@pytest.fixture
def make_spec(docker_home: tuple[Path, str]) -> Spec:
    return image_spec_factory(docker_home[1], "app", 3, PORT)


def serve(spec: Spec, **overrides: Any) -> InstanceSpec:
    return spec(["httpd", "-f", "-p", str(PORT), "-h", "/www"], **overrides)


def get(handle: InstanceHandle, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _DIRECT.open(f"http://{handle.address}/", timeout=1) as response:
                body: bytes = response.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def in_container(runtime: DockerRuntime, handle: InstanceHandle, script: str) -> str:
    code, out = runtime.exec(handle, ["sh", "-c", script], 10)
    assert code == 0, out
    return out


def log_lines(runtime: DockerRuntime, spec: InstanceSpec) -> list[tuple[str, str]]:
    """The instance's log so far ([] until its follower has written the first line)."""
    store = LogStore(runtime.logs_dir)
    try:
        return [(x.stream, x.line) for x in store.read(spec.service, spec.instance_id)]
    except KilnError:
        return []


def fresh_image(store: ImageStore, base: Path, token: str) -> str:
    """An image the engine has never seen (its content holds ``token``)."""
    tree = build_busybox_rootfs(base / token, www={"index.html": f"{token}\n"})
    return image_from_trees(store, [tree])


# -- choosing a runtime


def test_kiln_version_and_choosing_the_local_runtime_never_import_docker(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from kiln.cli.main import main\n"
        "main(['--version'])\n"
        "from kiln.runtime.select import open_runtime\n"
        f"open_runtime(__import__('pathlib').Path({str(tmp_path)!r}), 'local')\n"
        "print(sorted(m for m in sys.modules if m == 'docker' or m.startswith('docker.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines() == ["kiln 0.1.0", "[]"]


def test_open_runtime_by_kind(docker_engine: Dockerd, tmp_path: Path) -> None:
    docker_runtime = open_runtime(tmp_path, "docker", docker_engine.host)
    try:
        assert isinstance(docker_runtime, DockerRuntime)
        assert docker_runtime.name == "docker"
    finally:
        docker_runtime.close()
    assert open_runtime(tmp_path).name == "local"
    with pytest.raises(KilnError, match=r"unknown runtime kind 'podman': use one of local, docker"):
        open_runtime(tmp_path, "podman")
    with pytest.raises(KilnError, match=r'only used with kind = "docker"'):
        open_runtime(tmp_path, "local", docker_engine.host)


def test_an_unreachable_engine_is_named_with_what_to_do(tmp_path: Path) -> None:
    socket = tmp_path / "no-such.sock"
    with pytest.raises(RuntimeFailure) as caught:
        DockerRuntime(tmp_path, f"unix://{socket}")
    message = str(caught.value)
    assert f"unix://{socket} is unreachable" in message
    assert "start dockerd, or point [runtime] host (or DOCKER_HOST)" in message


def test_capabilities_are_those_the_engine_enforces(runtime: DockerRuntime) -> None:
    caps = runtime.capabilities
    assert (caps.exec, caps.signal, caps.volumes, caps.secrets) == (True, True, True, True)
    assert (caps.memory_limit, caps.cpu_limit, caps.pids_limit) == (True, True, True)
    # The private engine runs without userns-remap: root inside is root outside.
    assert caps.user_namespace is False
    assert caps.raw_layers is False
    assert isinstance(runtime, Execer) and isinstance(runtime, Signaller)


def test_raw_layer_trees_are_refused(runtime: DockerRuntime, make_spec: Spec) -> None:
    spec = make_spec(["true"], layers=(Path("/"),))
    with pytest.raises(RuntimeFailure, match=rf"instance {spec.instance_id}: .*raw layer trees"):
        runtime.start(spec)


# -- image delivery


def test_the_image_is_loaded_once_by_digest_under_the_homes_name(
    runtime: DockerRuntime, make_spec: Spec, api: Any, tmp_path: Path
) -> None:
    store = ImageStore(runtime.home / "images")
    token = "once-" + os.urandom(4).hex()
    digest = fresh_image(store, tmp_path, token)
    own_name = store.resolve(digest).annotations["org.opencontainers.image.ref.name"]
    config_digest = store.manifest(digest)["config"]["digest"]
    since = int(time.time()) - 1
    specs = [serve(make_spec, image_digest=digest) for _ in range(4)]
    gate = threading.Barrier(len(specs))
    handles: list[InstanceHandle] = []

    def start(spec: InstanceSpec) -> None:
        gate.wait()
        handles.append(runtime.start(spec))

    threads = [threading.Thread(target=start, args=(s,)) for s in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(handles) == 4
    loads = list(
        api.events(
            since=since,
            until=f"{time.time():.9f}",
            decode=True,
            filters={"type": "image", "event": "load"},
        )
    )
    assert len(loads) == 1, loads
    name = runtime.image_name(digest)
    assert name == f"kiln/{runtime.tag}:{digest.removeprefix('sha256:')}"
    assert api.inspect_image(name)["Id"] == config_digest
    # The archive's own name (test:…) is not left behind in the engine.
    assert own_name not in {t for image in api.images() for t in image["RepoTags"] or []}
    assert all(get(h) == f"{token}\n".encode() for h in handles)


def test_loading_leaves_an_existing_engine_name_where_it_pointed(
    runtime: DockerRuntime, make_spec: Spec, api: Any, tmp_path: Path, docker_home: tuple[Path, str]
) -> None:
    store = ImageStore(runtime.home / "images")
    digest = fresh_image(store, tmp_path, "kept-" + os.urandom(4).hex())
    own_name = store.resolve(digest).annotations["org.opencontainers.image.ref.name"]
    runtime.start(serve(make_spec))  # the module's image is in the engine now
    theirs = api.inspect_image(runtime.image_name(docker_home[1]))["Id"]
    repository, _, tag = own_name.rpartition(":")
    api.tag(theirs, repository, tag)
    try:
        runtime.start(serve(make_spec, image_digest=digest))
        assert api.inspect_image(own_name)["Id"] == theirs
    finally:
        api.remove_image(own_name, noprune=True)


def test_a_digest_missing_from_the_store_is_named(runtime: DockerRuntime, make_spec: Spec) -> None:
    missing = "sha256:" + "ab" * 32
    spec = serve(make_spec, image_digest=missing)
    with pytest.raises(RuntimeFailure) as caught:
        runtime.start(spec)
    assert str(caught.value).startswith(f"instance {spec.instance_id}: image {missing} is not in")
    assert "bake or import it first" in str(caught.value)


# -- the container as the engine records it and as the app sees it


def test_the_container_is_confined_as_the_spec_says(
    runtime: DockerRuntime, make_spec: Spec, api: Any
) -> None:
    spec = serve(
        make_spec,
        user="65534:65534",
        writable=("/scratch",),
        volumes=(VolumeMount("data", "/data"),),
        secrets={"token": SECRET},
        memory=64 * 1024 * 1024,
        cpu=0.5,
        pids=64,
        cap_add=("net_bind_service",),
        project="shop",
    )
    handle = runtime.start(spec)
    attrs = api.inspect_container(handle.data["container_id"])
    host = attrs["HostConfig"]
    assert attrs["Name"] == f"/kiln-{runtime.tag}-{spec.instance_id}"
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {"/tmp", "/run", "/scratch"}
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["NET_BIND_SERVICE"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["Memory"] == host["MemorySwap"] == spec.memory
    assert host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 64
    assert not host["PortBindings"] and not attrs["NetworkSettings"]["Ports"]
    assert attrs["Config"]["Hostname"] == spec.instance_id
    assert attrs["Config"]["User"] == "65534:65534"
    assert attrs["Config"]["Labels"] == {
        "dev.kiln.home": runtime.tag,
        "dev.kiln.project": "shop",
        "dev.kiln.service": "app",
        "dev.kiln.revision": "3",
        "dev.kiln.instance": spec.instance_id,
        "dev.kiln.image": spec.image_digest,
        "dev.kiln.port": str(PORT),
        "dev.kiln.started": attrs["Config"]["Labels"]["dev.kiln.started"],
        "dev.kiln.stop-grace": "2.0",
    }
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert mounts["/data"]["Type"] == "volume" and mounts["/data"]["RW"] is True
    assert mounts["/data"]["Name"] == f"kiln-{runtime.tag}-data"
    assert mounts["/run/secrets"]["Type"] == "bind" and mounts["/run/secrets"]["RW"] is False
    # As the app sees it: its user, no privilege, a read-only root, writable tmpfs (a path
    # the image has keeps the image's mode there: runc's rule, as for the local runtime).
    script = (
        "id -u; grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
        "touch /scratch/x && echo writable; touch /x 2>&1; hostname"
    )
    status = in_container(runtime, handle, script)
    assert status.split("\n")[:4] == [
        "65534",
        "CapBnd:\t0000000000000400",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ]
    assert "writable" in status and "Read-only file system" in status
    assert status.strip().endswith(spec.instance_id)
    assert get(handle) == b"hello from kiln\n"


def test_capabilities_the_spec_adds_are_the_only_ones_root_inside_has(
    runtime: DockerRuntime, make_spec: Spec
) -> None:
    plain = runtime.start(serve(make_spec))
    added = runtime.start(serve(make_spec, cap_add=("CAP_NET_BIND_SERVICE", "KILL")))

    def sets(handle: InstanceHandle) -> set[str]:
        """Every capability set of the app (pid 1's child) and of an exec, as hex."""
        text = in_container(runtime, handle, "cat /proc/[0-9]*/status")
        return set(re.findall(r"^Cap(?:Inh|Prm|Eff|Bnd|Amb):\s+([0-9a-f]{16})$", text, re.M))

    assert sets(plain) == {"0" * 16}
    assert sets(added) == {"0" * 16, f"{(1 << 10) | (1 << 5):016x}"}  # NET_BIND_SERVICE, KILL


def test_seccomp_is_dockers_default_unless_the_spec_says_unconfined(
    runtime: DockerRuntime, make_spec: Spec, api: Any
) -> None:
    confined = runtime.start(serve(make_spec))
    unconfined = runtime.start(serve(make_spec, seccomp=False))
    show = "grep '^Seccomp:' /proc/self/status"
    assert in_container(runtime, confined, show).split() == ["Seccomp:", "2"]
    assert in_container(runtime, unconfined, show).split() == ["Seccomp:", "0"]
    options = api.inspect_container(unconfined.data["container_id"])["HostConfig"]["SecurityOpt"]
    assert options == ["no-new-privileges", "seccomp=unconfined"]


def test_the_address_is_on_the_homes_network_internal_unless_outbound(
    runtime: DockerRuntime, make_spec: Spec, api: Any
) -> None:
    private = runtime.start(serve(make_spec))
    outbound = runtime.start(serve(make_spec, outbound=True))
    for handle, name, internal in (
        (private, f"kiln-{runtime.tag}", True),
        (outbound, f"kiln-{runtime.tag}-outbound", False),
    ):
        network = api.inspect_network(name)
        assert network["Internal"] is internal
        assert network["Labels"] == {LABEL_HOME: runtime.tag}
        assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"
        attached = api.inspect_container(handle.data["container_id"])["NetworkSettings"]
        assert list(attached["Networks"]) == [name]
        assert handle.host == attached["Networks"][name]["IPAddress"]
        assert handle.port == PORT and handle.address == f"{handle.host}:{PORT}"
        assert get(handle) == b"hello from kiln\n"


# -- secrets and volumes


def test_secrets_are_files_on_a_tmpfs_and_never_reach_a_disk(
    runtime: DockerRuntime,
    make_spec: Spec,
    api: Any,
    docker_engine: Dockerd,
) -> None:
    spec = serve(make_spec, user="65534:65534", secrets={"token": SECRET})
    handle = runtime.start(spec)
    directory = runtime.secrets_dir(spec.instance_id)
    mounted = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert any(f[4] == str(directory) and f[f.index("-") + 1] == "tmpfs" for f in mounted)
    st = (directory / "token").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o400, 65534, 65534)
    assert in_container(runtime, handle, "cat /run/secrets/token") == SECRET.decode()
    assert SECRET.decode() not in in_container(runtime, handle, "env; cat /proc/1/cmdline")
    recorded = json.dumps(api.inspect_container(handle.data["container_id"]))
    assert SECRET.decode() not in recorded
    on_disk = [docker_engine.data_root, runtime.home]
    assert files_containing(on_disk, SECRET) == []
    runtime.destroy(handle)
    assert not directory.exists()
    assert str(directory) not in Path("/proc/self/mountinfo").read_text()
    assert files_containing([*on_disk, RUN_ROOT], SECRET) == []


def test_a_named_volume_outlives_its_instances_and_belongs_to_the_apps_user(
    runtime: DockerRuntime, make_spec: Spec, api: Any
) -> None:
    volume = VolumeMount("notes", "/data")
    user = "65534:65534"
    writer = runtime.start(serve(make_spec, user=user, volumes=(volume,)))
    in_container(runtime, writer, "echo kept > /data/note")
    runtime.destroy(writer)
    reader = runtime.start(serve(make_spec, user=user, volumes=(volume,)))
    assert in_container(runtime, reader, "cat /data/note; stat -c %u /data") == "kept\n65534\n"
    found = api.inspect_volume(f"kiln-{runtime.tag}-notes")
    assert found["Labels"] == {LABEL_HOME: runtime.tag, "dev.kiln.volume": "notes"}
    runtime.destroy(reader)
    api.remove_volume(found["Name"])


# -- lifecycle


def test_wait_sleeps_in_the_engine_instead_of_polling(
    runtime: DockerRuntime, make_spec: Spec
) -> None:
    handle = runtime.start(make_spec(["sleep", "30"]))
    cpu = time.process_time()
    began = time.monotonic()
    assert runtime.wait(handle, 1.5).status is InstanceStatus.RUNNING
    assert 1.4 < time.monotonic() - began < 3
    assert time.process_time() - cpu < 0.05
    quick = runtime.start(make_spec(["sleep", "0.5"]))
    began = time.monotonic()
    state = runtime.wait(quick, 10)
    assert (state.status, state.exit_code) == (InstanceStatus.EXITED, 0)
    assert time.monotonic() - began < 2


def test_an_app_past_its_memory_limit_is_recorded_as_oom_killed(
    runtime: DockerRuntime, make_spec: Spec
) -> None:
    hog = runtime.start(
        make_spec(["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"], memory=32 << 20)
    )
    state = runtime.wait(hog, 20)
    assert (state.status, state.exit_code, state.oom_killed) == (InstanceStatus.EXITED, 137, True)
    killed = runtime.start(make_spec(["sleep", "30"], memory=32 << 20))
    state = runtime.stop(killed, 0, signal.SIGKILL)  # 137 too, but no OOM kill
    assert (state.status, state.exit_code, state.oom_killed) == (InstanceStatus.EXITED, 137, False)


def test_stop_sends_the_signal_asked_for_and_signal_reaches_the_app(
    runtime: DockerRuntime, make_spec: Spec
) -> None:
    script = (
        "trap 'echo got-hup' HUP; trap 'echo got-usr1; exit 7' USR1; echo ready; "
        "while true; do sleep 0.05; done"
    )
    spec = make_spec(["sh", "-c", script])
    handle = runtime.start(spec)
    deadline = time.monotonic() + 5
    while ("stdout", "ready") not in log_lines(runtime, spec):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runtime.signal(handle, signal.SIGHUP)
    while ("stdout", "got-hup") not in log_lines(runtime, spec):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert runtime.inspect(handle).status is InstanceStatus.RUNNING
    state = runtime.stop(handle, 5, signal.SIGUSR1)
    assert (state.status, state.exit_code) == (InstanceStatus.EXITED, 7)
    runtime.signal(handle, signal.SIGHUP)  # stopped: nothing to signal, no error


def test_exec_runs_in_the_instance_and_is_killed_past_its_timeout(
    runtime: DockerRuntime, make_spec: Spec
) -> None:
    handle = runtime.start(make_spec(["sleep", "30"], user="65534:65534"))
    code, output = runtime.exec(handle, ["sh", "-c", "id -u; echo err >&2; exit 4"], 5)
    assert (code, sorted(output.splitlines())) == (4, ["65534", "err"])
    began = time.monotonic()
    with pytest.raises(RuntimeFailure, match=r"exec 'sleep' timed out after 0.5s"):
        runtime.exec(handle, ["sleep", "31"], 0.5)
    assert time.monotonic() - began < 3
    deadline = time.monotonic() + 3
    while "sleep 31" in in_container(runtime, handle, "ps -o args"):
        assert time.monotonic() < deadline, "the timed-out exec still runs"
        time.sleep(0.05)
    runtime.stop(handle, 0)
    with pytest.raises(RuntimeFailure, match=r"not running, cannot exec"):
        runtime.exec(handle, ["true"], 5)


def test_frozen_evidence_holds_what_the_app_wrote_into_its_tmpfs_writable_path(
    runtime: DockerRuntime, make_spec: Spec, tmp_path: Path
) -> None:
    """A writable path is a tmpfs only the container's mount namespace holds: the
    engine's archive endpoint gave the empty directory beneath it (the bundle held
    ``data`` and nothing in it); read through /proc/PID/root it holds the app's file."""
    script = "echo written-by-the-app > /data/note; exec sleep 30"
    handle = runtime.start(make_spec(["sh", "-c", script], writable=("/data",)))
    deadline = time.monotonic() + 5
    while "note" not in in_container(runtime, handle, "ls /data"):
        assert time.monotonic() < deadline, "the app did not write its note"
        time.sleep(0.05)
    runtime.freeze(handle)
    try:
        facts = runtime.collect_evidence(handle, ["/data", "/nope"], tmp_path)
    finally:
        runtime.thaw(handle)
    with tarfile.open(tmp_path / "writable.tar") as kept:
        note = kept.extractfile("data/note")
        assert note is not None and note.read() == b"written-by-the-app\n"
    assert facts["writable"]["refused"] == ["/nope"]
    assert any("sleep" in str(p) for p in facts["processes"]), facts["processes"]
    runtime.destroy(handle)


def test_destroy_is_idempotent_and_keeps_the_logs(runtime: DockerRuntime, make_spec: Spec) -> None:
    spec = make_spec(["sh", "-c", "echo last words; sleep 30"])
    handle = runtime.start(spec)
    runtime.destroy(handle)
    runtime.destroy(handle)
    assert runtime.inspect(handle).status is InstanceStatus.GONE
    assert ("stdout", "last words") in log_lines(runtime, spec)


def test_a_stopped_instance_is_a_leftover_until_released(
    runtime: DockerRuntime, make_spec: Spec, api: Any
) -> None:
    spec = make_spec(["sh", "-c", "echo bye; exit 2"], secrets={"token": SECRET})
    handle = runtime.start(spec)
    assert runtime.wait(handle, 10).exit_code == 2
    assert runtime.leftovers() == [spec.instance_id]
    assert runtime.list() == []
    runtime.release(spec.instance_id)
    assert runtime.leftovers() == []
    assert api.containers(all=True, filters={"id": handle.data["container_id"]}) == []
    assert not runtime.secrets_dir(spec.instance_id).exists()
    assert log_lines(runtime, spec) == [("stdout", "bye")]


# -- logs


def test_logs_carry_both_streams_with_the_instances_meta(
    runtime: DockerRuntime, make_spec: Spec
) -> None:
    script = (
        "echo out-1; echo err-1 >&2; head -c 200000 /dev/zero | tr '\\0' L; echo; "
        "printf 'no newline at the end'"
    )
    spec = make_spec(["sh", "-c", script], service="logger")
    handle = runtime.start(spec)
    runtime.wait(handle, 10)
    runtime.destroy(handle)
    lines = log_lines(runtime, spec)
    # Each stream in its own order; across streams the order is the engine's read times,
    # which a loaded machine can swap (the first piece of the long line before err-1).
    assert [line for stream, line in lines if stream == "stderr"] == ["err-1"]
    assert next(line for stream, line in lines if stream == "stdout") == "out-1"
    long = [line for stream, line in lines if line.startswith("L")]
    assert [len(x) for x in long] == [MAX_LINE, MAX_LINE, MAX_LINE, 200000 - 3 * MAX_LINE]
    assert lines[-1] == ("stdout", "no newline at the end")
    [meta] = LogStore(runtime.logs_dir).instances("logger")
    assert (meta.service, meta.instance, meta.revision, meta.image_digest) == (
        "logger",
        spec.instance_id,
        3,
        spec.image_digest,
    )
    assert abs(meta.started - time.time()) < 60


def test_after_an_agent_restart_logs_resume_without_loss_or_repeat(
    docker_engine: Dockerd,
    docker_home: tuple[Path, str],
    make_spec: Spec,
) -> None:
    first = DockerRuntime(docker_home[0], docker_engine.host)
    count = "i=0; while [ $i -lt 60 ]; do i=$((i+1)); echo $i; echo e$i >&2; sleep 0.02; done"
    spec = make_spec(["sh", "-c", count + "; sleep 30"])
    handle = first.start(spec)
    time.sleep(0.4)
    first.close()  # the agent stops: nobody copies for a while
    copied_before = len(log_lines(first, spec))
    time.sleep(0.5)
    second = DockerRuntime(docker_home[0], docker_engine.host)
    try:
        assert second.recover(handle)
        deadline = time.monotonic() + 10
        while len(log_lines(second, spec)) < 120:
            assert time.monotonic() < deadline, log_lines(second, spec)[-3:]
            time.sleep(0.05)
        second.destroy(handle)
        lines = log_lines(second, spec)
        assert 0 < copied_before < len(lines) == 120
        assert [x for s, x in lines if s == "stdout"] == [str(i) for i in range(1, 61)]
        assert [x for s, x in lines if s == "stderr"] == [f"e{i}" for i in range(1, 61)]
    finally:
        tear_down(second)


def test_destroy_copies_what_ran_while_nobody_followed(
    docker_engine: Dockerd,
    docker_home: tuple[Path, str],
    make_spec: Spec,
) -> None:
    first = DockerRuntime(docker_home[0], docker_engine.host)
    spec = make_spec(["sh", "-c", "sleep 0.5; echo while-away; exit 5"])
    handle = first.start(spec)
    first.close()
    second = DockerRuntime(docker_home[0], docker_engine.host)
    try:
        state = second.wait(handle, 10)
        assert (state.status, state.exit_code) == (InstanceStatus.EXITED, 5)
        assert not second.recover(handle)
        second.destroy(handle)
        assert log_lines(second, spec) == [("stdout", "while-away")]
    finally:
        tear_down(second)


# -- a shared engine: only this home's containers


def test_list_and_clean_up_never_touch_containers_that_are_not_this_homes(
    runtime: DockerRuntime, make_spec: Spec, api: Any
) -> None:
    own = runtime.start(make_spec(["sleep", "30"]))
    image = runtime.image_name(make_spec(["true"]).image_digest)
    others = {}
    for label, labels in (
        ("unlabelled", {}),
        ("other-home", {LABEL_HOME: "0ther0me", LABEL_INSTANCE: "intruder"}),
        ("same-id", {LABEL_HOME: "0ther0me", LABEL_INSTANCE: own.instance_id}),
    ):
        created = api.create_container(
            image, command=["30"], entrypoint=["sleep"], labels=labels, name=f"foreign-{label}"
        )
        api.start(created["Id"])
        others[label] = created["Id"]
    try:
        assert [h.instance_id for h in runtime.list()] == [own.instance_id]
        assert runtime.leftovers() == []
        for label, container_id in others.items():
            instance = own.instance_id if label == "same-id" else "intruder"
            forged = InstanceHandle(2, "docker", instance, "", 0, {"container_id": container_id})
            assert runtime.inspect(forged).status is InstanceStatus.GONE
            assert not runtime.recover(forged)
            assert runtime.stop(forged, 0).status is InstanceStatus.GONE
            runtime.destroy(forged)
        runtime.destroy(own)
        runtime.shutdown()
        for container_id in others.values():
            assert api.inspect_container(container_id)["State"]["Running"] is True
    finally:
        for container_id in others.values():
            with contextlib.suppress(docker.errors.APIError):
                api.remove_container(container_id, force=True)


# -- an engine with its firewall on


OUTSIDE = "203.0.113.2"
OUTSIDE_PORT = 8081
_OUTSIDE_SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {OUTSIDE_PORT}))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(b"outside\\n")
    c.close()
"""


_GET = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.stdout.write(opener.open(sys.argv[1], timeout=3).read().decode())
"""


@pytest.fixture(scope="module")
def firewalled_engine() -> Iterator[Dockerd]:
    """An engine with Docker's iptables rules, in a network namespace of its own, with
    an "outside" (another namespace behind a veth) that answers on OUTSIDE."""
    try:
        engine = start_dockerd(netns=True)
    except DockerdUnavailable as e:
        pytest.skip(str(e))
    outside = f"kw-{os.urandom(4).hex()}"
    server = None
    try:
        for command in (
            ["ip", "netns", "add", outside],
            [
                "ip",
                "-n",
                str(engine.netns),
                "link",
                "add",
                "kw0",
                "type",
                "veth",
                "peer",
                "name",
                "kw1",
                "netns",
                outside,
            ],
            ["ip", "-n", str(engine.netns), "addr", "add", "203.0.113.1/24", "dev", "kw0"],
            ["ip", "-n", str(engine.netns), "link", "set", "kw0", "up"],
            ["ip", "-n", outside, "addr", "add", f"{OUTSIDE}/24", "dev", "kw1"],
            ["ip", "-n", outside, "link", "set", "kw1", "up"],
        ):
            subprocess.run(command, check=True, capture_output=True)
        server = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{outside}", sys.executable, "-c", _OUTSIDE_SERVER]
        )
        yield engine
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "delete", outside], capture_output=True)
        engine.stop()


def test_with_the_engines_firewall_instances_are_apart_and_only_outbound_ones_leave(
    firewalled_engine: Dockerd, docker_home: tuple[Path, str], make_spec: Spec
) -> None:
    runtime = DockerRuntime(docker_home[0], firewalled_engine.host)
    try:
        private = runtime.start(serve(make_spec))
        neighbour = runtime.start(serve(make_spec))
        outbound = runtime.start(serve(make_spec, outbound=True))

        def from_host(handle: InstanceHandle) -> str:
            get = [sys.executable, "-c", _GET, f"http://{handle.address}/"]
            for _ in range(50):
                done = subprocess.run(firewalled_engine.in_netns(get), capture_output=True)
                if done.returncode == 0:
                    return done.stdout.decode()
                time.sleep(0.05)
            return done.stderr.decode()

        def reach(handle: InstanceHandle, address: str, port: int) -> str:
            request = "printf 'GET / HTTP/1.0\\r\\n\\r\\n'"
            script = f"{request} | nc -w 1 {address} {port} 2>/dev/null; true"
            return in_container(runtime, handle, script)

        # The host (where the proxy runs) reaches every instance at its own address.
        for handle in (private, neighbour, outbound):
            assert from_host(handle) == "hello from kiln\n"
        # Only an outbound instance reaches beyond the host.
        attempts = {
            "outbound to the outside": (outbound, OUTSIDE, OUTSIDE_PORT),
            "private to the outside": (private, OUTSIDE, OUTSIDE_PORT),
            "private to its neighbour": (private, neighbour.host, PORT),
            "outbound to a private one": (outbound, private.host, PORT),
            "private to an outbound one": (private, outbound.host, PORT),
            "private to itself": (private, private.host, PORT),
        }
        with ThreadPoolExecutor(len(attempts)) as pool:
            answers = dict(
                zip(attempts, pool.map(lambda a: reach(*a), attempts.values()), strict=True)
            )
        assert answers == {
            # Only an outbound instance reaches beyond the host.
            "outbound to the outside": "outside\n",
            "private to the outside": "",
            # Instances never reach each other directly (only through the proxy).
            "private to its neighbour": "",
            "outbound to a private one": "",
            "private to an outbound one": "",
            # The control: nc does reach what it may.
            "private to itself": answers["private to itself"],
        }
        assert "hello from kiln" in answers["private to itself"]
    finally:
        tear_down(runtime)
