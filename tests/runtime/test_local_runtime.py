"""The local runtime: the OCI config as data, then real runc sandboxes."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from runtime_contract import AppSpec, http_get
from sandboxes import (
    build_image_tree,
    logs_of,
    run_to_exit,
    shifted_image_tree,
    stdout_of,
    tree_listing,
)

from kiln.observe.logs import LogStore
from kiln.oci.config import runtime_config
from kiln.oci.idmap import id_range
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
from kiln.runtime.local import INIT_BINARY, LocalRuntime, parse_user
from leftovers import files_containing, leftovers

MiB = 2**20


def _spec(**overrides: object) -> InstanceSpec:
    fields: dict[str, object] = {
        "instance_id": "web-1a2b3c4d",
        "service": "web",
        "revision": 3,
        "image_digest": "sha256:" + "cd" * 32,
        "layers": (Path("/k/layers/base"), Path("/k/layers/app")),
        "command": ["python3", "server.py"],
        "user": "1000:1000",
        "workdir": "/srv/app",
        "env": {"PORT": "41234", "GREETING": "hi"},
        "port": 41234,
        "writable": ("/var/cache",),
        "volumes": (
            VolumeMount("data", "/data"),
            VolumeMount("ro", "/ro", True),
        ),
        "secrets": {"api_key": b"never-in-config"},
        "memory": 64 * MiB,
        "cpu": 0.5,
        "pids": 64,
    }
    fields.update(overrides)
    return InstanceSpec(**fields)  # type: ignore[arg-type]


def test_the_oci_config_maps_the_user_into_the_homes_range_and_grants_nothing(
    home: Path,
) -> None:
    """The whole sandbox as data: what it maps, mounts, limits, and what it never holds."""
    runtime = LocalRuntime(home)
    spec = _spec()
    config = runtime_config(runtime.sandbox_config(spec, home / "instances" / spec.instance_id))
    ids = id_range(home)
    view = runtime.view_dir(spec.instance_id)
    assert str(view).startswith(str(RUN_ROOT)) and not str(view).startswith(str(home))
    linux = config["linux"]
    assert (
        linux["uidMappings"]
        == linux["gidMappings"]
        == [{"containerID": 0, "hostID": ids.base, "size": 65536}]
    )
    assert {n["type"] for n in linux["namespaces"]} == {
        "pid", "ipc", "uts", "mount", "user", "cgroup", "network",
    }  # fmt: skip
    assert linux["cgroupsPath"] == runtime.container_id(spec.instance_id)
    assert linux["resources"]["pids"] == {"limit": 64}
    assert linux["resources"]["memory"] == {"limit": 64 * MiB, "swap": 64 * MiB}
    assert linux["resources"]["cpu"] == {"quota": 50_000, "period": 100_000}
    assert "seccomp" in linux
    assert config["root"] == {"path": str(view / "rootfs"), "readonly": True}
    assert config["hostname"] == spec.instance_id
    process = config["process"]
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000]}
    assert process["cwd"] == "/srv/app"
    assert sorted(process["env"]) == ["GREETING=hi", "PORT=41234"]
    assert process["noNewPrivileges"] is True
    assert all(not caps for caps in process["capabilities"].values())
    if INIT_BINARY.exists():
        assert process["args"] == ["/dev/init", "-g", "--", "python3", "server.py"]
    mounts = {m["destination"]: m for m in config["mounts"]}
    for writable in ("/tmp", "/run", "/var/cache"):
        assert mounts[writable]["type"] == "tmpfs"
    assert mounts["/data"]["source"] == str(view / "volumes" / "0")
    assert "rw" in mounts["/data"]["options"] and "ro" in mounts["/ro"]["options"]
    assert mounts["/run/secrets"]["source"] == str(view / "secrets")
    assert {"ro", "noexec", "nosuid", "nodev"} <= set(mounts["/run/secrets"]["options"])
    assert b"never-in-config" not in json.dumps(config).encode()


@pytest.mark.parametrize(
    ("user", "ids"), [(None, (0, 0)), ("65534:65534", (65534, 65534)), ("1000", (1000, 1000))]
)
def test_parse_user(user: str | None, ids: tuple[int, int]) -> None:
    assert parse_user(user) == ids


def test_a_named_user_is_refused_with_the_user_in_the_message() -> None:
    with pytest.raises(RuntimeFailure, match="'nobody'"):
        parse_user("nobody")


def wait_for_line(
    runtime: LocalRuntime, spec: InstanceSpec, wanted: str, timeout: float = 5
) -> list[str]:
    """The instance's stdout so far, once ``wanted`` has been printed."""
    deadline = time.monotonic() + timeout
    while True:
        out = [line.line for line in logs_of(runtime, spec) if line.stream == "stdout"]
        if wanted in out:
            return out
        assert time.monotonic() < deadline, f"{wanted!r} never printed; got {out}"
        time.sleep(0.02)


def test_hostname_is_the_instance_id_and_env_and_port_are_visible(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    spec = make_spec(
        ["sh", "-c", "hostname; echo $PORT $GREETING; env | sort"], env={"GREETING": "hello"}
    )
    out = stdout_of(local_runtime, spec)
    assert out[0] == spec.instance_id
    assert out[1] == f"{spec.port} hello"
    env = [line for line in out[2:] if not line.startswith("HOME=")]
    assert sorted(env) == sorted(
        ["GREETING=hello", "PATH=/bin", f"PORT={spec.port}", "PWD=/", "SHLVL=1"]
    )


@pytest.mark.parametrize("user", ["65534:65534", "1000:2000"])
def test_runs_as_the_image_user(local_runtime: LocalRuntime, make_spec: AppSpec, user: str) -> None:
    out = stdout_of(local_runtime, make_spec(["sh", "-c", "id -u; id -g"], user=user))
    assert out == user.split(":")


def test_a_tree_shifted_into_the_homes_range_shows_image_files_owned_by_root(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path, tmp_path: Path, image_tree: Path
) -> None:
    """Ownership is what the unpacker shifts; unshifted (host root) files show as nobody."""
    shifted = shifted_image_tree(tmp_path / "shifted", home)
    assert (shifted / "bin" / "busybox").stat().st_uid == id_range(home).base

    def owners(layer: Path) -> dict[str, str]:
        out = stdout_of(local_runtime, make_spec(["ls", "-ln", "/"], layers=(layer,)))
        columns = [line.split() for line in out if len(line.split()) >= 9]
        return {c[-1]: f"{c[2]}:{c[3]}" for c in columns}

    inside = owners(shifted)
    assert inside["bin"] == inside["www"] == inside["etc"] == "0:0"
    assert owners(image_tree)["bin"] == "65534:65534"


def test_a_new_named_volume_belongs_to_the_instance_user_and_data_persists(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    source = home / "volumes" / "data"
    volume = (VolumeMount("data", "/data"),)
    first = make_spec(
        ["sh", "-c", "stat -c '%u:%g' /data; echo kept > /data/f"], user="1000:1000", volumes=volume
    )
    assert stdout_of(local_runtime, first) == ["1000:1000"]
    base = id_range(home).base
    assert (source.stat().st_uid, source.stat().st_gid) == (base + 1000, base + 1000)
    assert (source / "f").stat().st_uid == base + 1000
    second = make_spec(["cat", "/data/f"], user="1000:1000", volumes=volume)
    assert stdout_of(local_runtime, second) == ["kept"]
    readonly = make_spec(
        ["sh", "-c", "cat /data/f; echo x > /data/g 2>/dev/null || echo read-only"],
        user="1000:1000",
        volumes=(VolumeMount("data", "/data", readonly=True),),
    )
    assert stdout_of(local_runtime, readonly) == ["kept", "read-only"]


def test_secrets_are_files_for_the_instance_user_and_never_on_disk_nor_in_env_or_cmdline(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    """The value lives on a tmpfs in the shim's private mount namespace, and nowhere else."""
    value = secrets.token_hex(24).encode()
    script = (
        "stat -c '%a %u %g' /run/secrets/api_key; sha256sum /run/secrets/api_key; "
        "echo x > /run/secrets/api_key 2>/dev/null || echo no-write; "
        "env; echo ready; exec sleep 30"
    )
    spec = make_spec(["sh", "-c", script], user="1000:1000", secrets={"api_key": value})
    handle = local_runtime.start(spec)
    out = wait_for_line(local_runtime, spec, "ready")
    assert out[0] == "400 1000 1000"
    assert out[1].split()[0] == hashlib.sha256(value).hexdigest()
    assert out[2] == "no-write"
    assert not any(value.decode() in line for line in out)

    code, inside = local_runtime.exec(
        handle, ["sh", "-c", "cat /proc/1/cmdline /proc/1/environ /proc/[0-9]*/cmdline"], 5
    )
    assert code == 0 and inside and value.decode() not in inside
    for pid in (int(handle.data["shim_pid"]), int(handle.data["sandbox_pid"])):
        for part in ("cmdline", "environ"):
            assert value not in Path(f"/proc/{pid}/{part}").read_bytes()
    assert files_containing([home, RUN_ROOT], value) == []
    # On the host the view holds only the empty mount point runc exec starts from.
    view = local_runtime.view_dir(spec.instance_id)
    assert [p.name for p in view.iterdir()] == ["rootfs"]
    assert list((view / "rootfs").iterdir()) == []


def test_the_root_is_read_only_even_for_root_but_tmp_run_and_writable_paths_are_not(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    script = (
        "touch /bin/x 2>/dev/null && echo root-writable || echo root-ro; "
        "echo a > /tmp/a && echo tmp-ok; echo b > /cache/b && echo cache-ok; "
        "echo c > /run/c && echo run-ok"
    )
    spec = make_spec(["sh", "-c", script], writable=("/cache",))
    assert stdout_of(local_runtime, spec) == ["root-ro", "tmp-ok", "cache-ok", "run-ok"]


def test_a_layer_without_mount_points_starts_and_is_never_written(
    local_runtime: LocalRuntime, make_spec: AppSpec, tmp_path: Path
) -> None:
    """Layers are shared by every instance: runc's mount points go to the overlay's upper dir."""
    bare = build_image_tree(tmp_path / "bare", mount_points=False)
    before = tree_listing(bare)
    spec = make_spec(
        ["sh", "-c", "touch /x 2>/dev/null || echo ro; echo y > /scratch/y && echo ok; ls /"],
        layers=(bare,),
        writable=("/scratch",),
    )
    out = stdout_of(local_runtime, spec)
    assert out[:2] == ["ro", "ok"]
    assert {"proc", "dev", "sys", "tmp", "run", "scratch"} <= set(out[2:])
    assert tree_listing(bare) == before


def test_layers_stack_bottom_first_and_a_whiteout_in_an_upper_layer_hides_a_lower_file(
    local_runtime: LocalRuntime, make_spec: AppSpec, tmp_path: Path
) -> None:
    lower = build_image_tree(tmp_path / "lower")
    (lower / "etc" / "motd").write_text("from lower\n")
    upper = tmp_path / "upper"
    (upper / "www").mkdir(parents=True)
    (upper / "www" / "index.html").write_text("from upper\n")
    (upper / "etc").mkdir()
    os.mknod(upper / "etc" / "motd", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (upper / "opt").mkdir()
    (upper / "opt" / "new").write_text("only upper\n")
    before = tree_listing(lower), tree_listing(upper)
    script = (
        "cat /www/index.html; test -e /etc/motd && echo motd-visible || echo motd-hidden; "
        "cat /opt/new; head -1 /etc/passwd"
    )
    spec = make_spec(["sh", "-c", script], layers=(lower, upper))
    assert stdout_of(local_runtime, spec) == [
        "from upper",
        "motd-hidden",
        "only upper",
        "root:x:0:0::/:/bin/sh",
    ]
    assert (tree_listing(lower), tree_listing(upper)) == before


def test_logs_are_timestamped_per_stream_and_survive_destroy(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    before = time.time()
    spec = make_spec(["sh", "-c", "echo out1; echo err1 >&2; echo out2"])
    handle = local_runtime.start(spec)
    local_runtime.wait(handle, 10)
    local_runtime.destroy(handle)
    assert not (home / "instances" / spec.instance_id).exists()
    lines = list(LogStore(home / "logs").read("web", spec.instance_id))
    assert sorted((line.stream, line.line) for line in lines) == [
        ("stderr", "err1"),
        ("stdout", "out1"),
        ("stdout", "out2"),
    ]
    assert all(before <= line.ts <= time.time() for line in lines)
    meta = LogStore(home / "logs").instances("web")
    assert [(m.instance, m.revision, m.image_digest) for m in meta] == [
        (spec.instance_id, 1, spec.image_digest)
    ]


def test_a_missing_command_exits_with_the_reason_in_the_log(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    code, lines = run_to_exit(local_runtime, make_spec(["/no/such/app"]))
    assert code == 127
    reasons = [line.line for line in lines if line.stream == "stderr"]
    assert any("/no/such/app" in r and "no such file" in r.lower() for r in reasons), reasons


RefusedSpec = Callable[[AppSpec, Path], InstanceSpec]
REFUSED: dict[str, tuple[RefusedSpec, str]] = {
    "a missing layer": (
        lambda make, tmp: make(["true"], layers=(tmp / "gone",)),
        r"image layer .*/gone not found",
    ),
    "an image the store does not have": (
        lambda make, tmp: make(["true"], layers=()),
        r"cannot unpack the layers of image sha256:abab",
    ),
    "a volume name that climbs out": (
        lambda make, tmp: make(["true"], volumes=(VolumeMount("../etc", "/data"),)),
        "volume name",
    ),
    "a named user": (lambda make, tmp: make(["true"], user="nobody"), "'nobody'"),
    "a user outside the mapped range": (
        lambda make, tmp: make(["true"], user="70000"),
        "outside the 65536 ids",
    ),
    "an unknown capability": (
        lambda make, tmp: make(["true"], cap_add=("CAP_BOGUS",)),
        "unknown capability",
    ),
    "a volume that is a file": (
        lambda make, tmp: make(["true"], volumes=(VolumeMount("file", "/data"),)),
        "is not a directory",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_start_says_why_and_leaves_nothing_behind(
    local_runtime: LocalRuntime, make_spec: AppSpec, tmp_path: Path, home: Path, case: str
) -> None:
    (home / "volumes").mkdir(mode=0o700, exist_ok=True)
    (home / "volumes" / "file").write_text("not a volume\n")
    build, message = REFUSED[case]
    spec = build(make_spec, tmp_path)
    with pytest.raises(RuntimeFailure, match=message) as refused:
        local_runtime.start(spec)
    assert spec.instance_id in str(refused.value)
    assert not (home / "instances" / spec.instance_id).exists()
    assert local_runtime.leftovers() == []


def test_starting_the_same_instance_twice_is_refused_and_the_first_keeps_running(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    spec = make_spec(["sleep", "30"])
    handle = local_runtime.start(spec)
    with pytest.raises(RuntimeFailure, match="already exists"):
        local_runtime.start(spec)
    assert local_runtime.inspect(handle).status is InstanceStatus.RUNNING


def test_start_is_fast(local_runtime: LocalRuntime, make_spec: AppSpec) -> None:
    """Measured on the dev VM (runc 1.1.5, cgroup v1): median 0.15 s, range 0.10-0.19 s over
    15 starts, from start() to a running app (shim, overlay, runc create, veth, runc start).
    The bound only catches a pathological regression."""
    began = time.monotonic()
    handle = local_runtime.start(make_spec(["sleep", "30"]))
    elapsed = time.monotonic() - began
    assert local_runtime.inspect(handle).status is InstanceStatus.RUNNING
    assert elapsed < 2.0, f"start took {elapsed:.2f}s"


def test_pid_reuse_guard_rejects_a_handle_with_the_wrong_start_time(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    handle = local_runtime.start(make_spec(["sleep", "30"]))
    data = {**handle.data, "shim_start_time": handle.data["shim_start_time"] - 1}
    impostor = InstanceHandle(**{**handle.__dict__, "data": data})
    assert local_runtime.recover(handle)
    assert not local_runtime.recover(impostor)
    assert local_runtime.inspect(impostor).status is not InstanceStatus.RUNNING
    assert local_runtime.stop(impostor, grace=0).status is not InstanceStatus.RUNNING
    assert local_runtime.inspect(handle).status is InstanceStatus.RUNNING


HOG = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}"


def test_a_hungry_process_is_oom_killed_and_the_state_says_so(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    spec = make_spec(["sh", "-c", HOG], memory=64 * MiB)
    handle = local_runtime.start(spec)
    state = local_runtime.wait(handle, 20)
    assert state.status is InstanceStatus.EXITED
    assert state.oom_killed
    assert state.exit_code == 137
    assert "survived" not in " ".join(line.line for line in logs_of(local_runtime, spec))


def test_a_small_process_fits_in_the_same_memory_limit(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    spec = make_spec(
        ["sh", "-c", "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo ${#x}"], memory=64 * MiB
    )
    handle = local_runtime.start(spec)
    state = local_runtime.wait(handle, 10)
    assert (state.exit_code, state.oom_killed) == (0, False)
    assert [line.line for line in logs_of(local_runtime, spec)] == ["1000000"]


def cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory, in every hierarchy, with this exact name."""
    found = []
    for directory, dirs, _files in os.walk("/sys/fs/cgroup"):
        found += [Path(directory) / d for d in dirs if d == name]
    return found


def container_pids(container_id: str) -> list[int]:
    """Host pids of every process of the container (by its pids cgroup)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"/{container_id}\n" in (entry / "cgroup").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_fork_loop_cannot_exceed_the_pids_limit(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    script = "(while true; do sleep 30 & done) 2>/dev/null; echo bomb-stopped; exec sleep 30"
    spec = make_spec(["sh", "-c", script], pids=64)
    handle = local_runtime.start(spec)
    wait_for_line(local_runtime, spec, "bomb-stopped", timeout=10)
    container = local_runtime.container_id(spec.instance_id)
    pids_dir = next(d for d in cgroup_dirs(container) if (d / "pids.max").exists())
    assert (pids_dir / "pids.max").read_text().strip() == "64"
    inside = container_pids(container)
    assert 50 <= len(inside) <= 64, len(inside)
    assert local_runtime.inspect(handle).status is InstanceStatus.RUNNING


def test_the_limits_are_set_on_the_containers_cgroups_which_go_on_destroy(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    spec = make_spec(["sleep", "30"], memory=64 * MiB, cpu=0.5)
    handle = local_runtime.start(spec)
    container = local_runtime.container_id(spec.instance_id)
    dirs = cgroup_dirs(container)
    limits = {
        f.name: f.read_text().strip()
        for d in dirs
        for name in ("memory.limit_in_bytes", "memory.max", "cpu.cfs_quota_us", "cpu.max")
        if (f := d / name).exists()
    }
    assert limits.get("memory.limit_in_bytes", limits.get("memory.max")) == str(64 * MiB)
    assert limits.get("cpu.cfs_quota_us") == "50000" or limits.get("cpu.max") == "50000 100000"
    assert int(handle.data["sandbox_pid"]) in container_pids(container)
    local_runtime.destroy(handle)
    assert [d for d in dirs if d.exists()] == []
    assert container_pids(container) == []


def test_exec_runs_inside_the_instance_as_its_user(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    assert isinstance(local_runtime, Execer)
    spec = make_spec(["sh", "-c", "exec httpd -f -p $PORT -h /www"], user="1000:1000")
    handle = local_runtime.start(spec)
    http_get(handle, spec.port)
    code, output = local_runtime.exec(handle, ["sh", "-c", "hostname; id -u; echo $PORT"], 5)
    assert (code, output.split()) == (0, [spec.instance_id, "1000", str(spec.port)])
    request = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 127.0.0.1 $PORT | tail -1"
    assert local_runtime.exec(handle, ["sh", "-c", request], 5) == (0, "hello from kiln\n")
    assert local_runtime.exec(handle, ["sh", "-c", "exit 4"], 5)[0] == 4
    local_runtime.stop(handle, grace=1)
    with pytest.raises(RuntimeFailure, match="not running"):
        local_runtime.exec(handle, ["true"], 5)


def test_root_inside_holds_no_capability_unless_one_is_added(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    show = ["sh", "-c", "grep CapEff /proc/self/status"]
    assert stdout_of(local_runtime, make_spec(show)) == ["CapEff:\t0000000000000000"]
    added = stdout_of(local_runtime, make_spec(show, cap_add=("net_admin",)))
    assert added == [f"CapEff:\t{1 << 12:016x}"]


def test_signal_delivers_to_the_app_without_stopping_it(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    assert isinstance(local_runtime, Signaller)
    script = "trap 'echo got-usr1' USR1; echo ready; while true; do sleep 0.05; done"
    spec = make_spec(["sh", "-c", script])
    handle = local_runtime.start(spec)
    wait_for_line(local_runtime, spec, "ready")
    local_runtime.signal(handle, signal.SIGUSR1)
    wait_for_line(local_runtime, spec, "got-usr1")
    assert local_runtime.inspect(handle).status is InstanceStatus.RUNNING
    with pytest.raises(RuntimeFailure, match="cannot be forwarded"):
        local_runtime.signal(handle, signal.SIGKILL)


def test_nothing_runs_after_destroy(local_runtime: LocalRuntime, make_spec: AppSpec) -> None:
    """The shim, the container and its lease all go with destroy; only logs stay."""
    spec = make_spec(["sh", "-c", "exec httpd -f -p $PORT -h /www"])
    handle = local_runtime.start(spec)
    http_get(handle, spec.port)
    local_runtime.destroy(handle)
    held = leftovers(local_runtime.home)
    assert not any(
        what.startswith(("shim process", "process", "runc container", "cgroup"))
        or local_runtime.container_id(spec.instance_id) in what
        for what in held
    ), held
    assert local_runtime.runc.list() == []
