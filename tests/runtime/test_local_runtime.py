"""The local runtime: the bwrap argv as data, then real sandboxes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from runtime_contract import AppSpec, http_get

from busybox_tree import build_busybox_rootfs
from kiln.observe.logs import LogLine, LogStore
from kiln.runtime import (
    Execer,
    InstanceHandle,
    InstanceSpec,
    InstanceStatus,
    RuntimeFailure,
    VolumeMount,
)
from kiln.runtime.local import LocalRuntime, bwrap_command, mount_points, parse_user

SPEC = InstanceSpec(
    instance_id="web-1a2b3c4d",
    service="web",
    revision=3,
    image_digest="sha256:" + "cd" * 32,
    rootfs=Path("/k/rootfs/abc"),
    command=["python3", "server.py"],
    user="65534:65534",
    workdir="/srv/app",
    env={"PORT": "41234", "GREETING": "hi"},
    port=41234,
    writable=("/var/cache",),
    volumes=(
        VolumeMount(Path("/k/volumes/data"), "/data"),
        VolumeMount(Path("/k/ro"), "/ro", True),
    ),
)


def test_bwrap_command_binds_the_shared_rootfs_read_only_and_drops_to_the_image_user() -> None:
    argv = bwrap_command(SPEC, bwrap="/bin/bwrap", secrets_dir=Path("/k/instances/x/secrets"))
    assert argv == [
        "/bin/bwrap",
        "--ro-bind", "/k/rootfs/abc", "/",
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
        "--tmpfs", "/var/cache",
        "--bind", "/k/volumes/data", "/data",
        "--ro-bind", "/k/ro", "/ro",
        "--ro-bind", "/k/instances/x/secrets", "/run/secrets",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "web-1a2b3c4d",
        "--unshare-user", "--uid", "65534", "--gid", "65534",
        "--die-with-parent", "--new-session", "--chdir", "/srv/app", "--clearenv",
        "--setenv", "GREETING", "hi", "--setenv", "PORT", "41234",
        "--", "python3", "server.py",
    ]  # fmt: skip


def test_bwrap_command_overlays_a_rootfs_without_mount_points_then_remounts_it_read_only() -> None:
    spec = InstanceSpec(**{**SPEC.__dict__, "user": None, "volumes": (), "writable": ()})
    argv = bwrap_command(spec, bwrap="bwrap", secrets_dir=None, overlay_root=True)
    assert argv[:4] == ["bwrap", "--overlay-src", "/k/rootfs/abc", "--tmp-overlay"]
    assert argv[argv.index("--remount-ro") + 1] == "/"
    assert argv.index("--remount-ro") > argv.index("--tmpfs")
    assert "--unshare-user" not in argv
    assert "/run/secrets" not in argv


def test_mount_points_cover_every_mount_target() -> None:
    assert mount_points(SPEC) == ["/proc", "/dev", "/tmp", "/run", "/var/cache", "/data", "/ro"]


@pytest.mark.parametrize(
    ("user", "ids"), [(None, (0, 0)), ("65534:65534", (65534, 65534)), ("1000", (1000, 1000))]
)
def test_parse_user(user: str | None, ids: tuple[int, int]) -> None:
    assert parse_user(user) == ids


def test_a_named_user_is_refused_with_the_user_in_the_message() -> None:
    with pytest.raises(RuntimeFailure, match="'nobody'"):
        parse_user("nobody")


def run_to_exit(runtime: LocalRuntime, spec: InstanceSpec) -> tuple[int | None, list[LogLine]]:
    handle = runtime.start(spec)
    state = runtime.wait(handle, 10)
    assert state.status is InstanceStatus.EXITED, state
    lines = list(LogStore(runtime.logs_dir).read(spec.service, spec.instance_id))
    return state.exit_code, lines


def stdout_of(runtime: LocalRuntime, spec: InstanceSpec) -> list[str]:
    code, lines = run_to_exit(runtime, spec)
    assert code == 0, [line.line for line in lines]
    return [line.line for line in lines if line.stream == "stdout"]


def test_hostname_is_the_instance_id_and_env_and_port_are_visible(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    spec = make_spec(
        ["sh", "-c", "hostname; echo $PORT $GREETING; env | sort"], env={"GREETING": "hello"}
    )
    out = stdout_of(local_runtime, spec)
    assert out[0] == spec.instance_id
    assert out[1] == f"{spec.port} hello"
    assert sorted(out[2:]) == sorted(
        ["GREETING=hello", "PATH=/bin", f"PORT={spec.port}", "PWD=/", "SHLVL=1"]
    )


def test_runs_as_the_image_user(local_runtime: LocalRuntime, make_spec: AppSpec) -> None:
    out = stdout_of(local_runtime, make_spec(["sh", "-c", "id -u; id -g"], user="65534:65534"))
    assert out == ["65534", "65534"]


def test_the_image_user_can_use_volumes_and_secrets_kept_in_a_private_home(
    make_spec: AppSpec, tmp_path: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    runtime = LocalRuntime(private / "home")
    volume = (VolumeMount(private / "home" / "volumes" / "v", "/data"),)
    spec = make_spec(
        ["sh", "-c", "cat /run/secrets/k; echo; echo w > /data/w && echo written"],
        user="65534:65534",
        volumes=volume,
        secrets={"k": b"v"},
    )
    try:
        assert stdout_of(runtime, spec) == ["v", "written"]
    finally:
        handle = runtime.handle_for(spec.instance_id)
        if handle is not None:
            runtime.destroy(handle)


def test_rootfs_is_read_only_but_tmp_and_writable_paths_are_writable(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    script = (
        "touch /bin/x 2>/dev/null && echo rootfs-writable || echo rootfs-ro; "
        "echo a > /tmp/a && echo tmp-ok; echo b > /cache/b && echo cache-ok; "
        "echo c > /run/c && echo run-ok"
    )
    spec = make_spec(["sh", "-c", script], user="65534:65534", writable=("/cache",))
    assert stdout_of(local_runtime, spec) == ["rootfs-ro", "tmp-ok", "cache-ok", "run-ok"]


def test_a_rootfs_without_mount_points_still_starts_and_stays_untouched(
    local_runtime: LocalRuntime, make_spec: AppSpec, tmp_path: Path
) -> None:
    bare = build_busybox_rootfs(tmp_path / "bare", www={"index.html": "hi\n"}, mount_points=())
    before = sorted(p.name for p in bare.iterdir())
    spec = make_spec(
        ["sh", "-c", "touch /x 2>/dev/null || echo ro; echo y > /scratch/y && echo ok"],
        rootfs=bare,
        writable=("/scratch",),
    )
    assert stdout_of(local_runtime, spec) == ["ro", "ok"]
    assert sorted(p.name for p in bare.iterdir()) == before


def test_a_volume_persists_across_instances(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    volume = (VolumeMount(home / "volumes" / "data", "/data"),)
    first = make_spec(["sh", "-c", "echo kept > /data/f"], user="65534:65534", volumes=volume)
    stdout_of(local_runtime, first)
    second = make_spec(["cat", "/data/f"], user="65534:65534", volumes=volume)
    assert stdout_of(local_runtime, second) == ["kept"]


def test_secrets_are_files_under_run_secrets_and_not_in_the_environment(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    spec = make_spec(
        ["sh", "-c", "cat /run/secrets/api_key; echo; env"],
        user="65534:65534",
        secrets={"api_key": b"s3cr3t"},
    )
    out = stdout_of(local_runtime, spec)
    assert out[0] == "s3cr3t"
    assert not any("s3cr3t" in line for line in out[1:])
    assert b"s3cr3t" not in (home / "instances" / spec.instance_id / "spec.json").read_bytes()
    secrets_dir = home / "instances" / spec.instance_id / "secrets"
    assert secrets_dir.stat().st_mode & 0o777 == 0o700


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


def test_a_missing_command_exits_with_bwraps_reason_in_the_log(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    code, lines = run_to_exit(local_runtime, make_spec(["/no/such/app"]))
    assert code == 1
    assert any("/no/such/app" in line.line and line.stream == "stderr" for line in lines)


def test_a_missing_rootfs_is_refused_naming_it(
    local_runtime: LocalRuntime, make_spec: AppSpec, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeFailure, match=r"rootfs .*/gone not found"):
        local_runtime.start(make_spec(["true"], rootfs=tmp_path / "gone"))


def test_starting_the_same_instance_twice_is_refused(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    spec = make_spec(["sleep", "30"])
    local_runtime.start(spec)
    with pytest.raises(RuntimeFailure, match="already exists"):
        local_runtime.start(spec)


def test_start_is_fast(local_runtime: LocalRuntime, make_spec: AppSpec) -> None:
    began = time.monotonic()
    local_runtime.start(make_spec(["sleep", "30"]))
    assert time.monotonic() - began < 1.0


def test_pid_reuse_guard_rejects_a_handle_with_the_wrong_start_time(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    handle = local_runtime.start(make_spec(["sleep", "30"]))
    impostor = InstanceHandle(**{**handle.__dict__, "start_time": handle.start_time - 1})
    assert local_runtime.recover(handle)
    assert not local_runtime.recover(impostor)
    assert local_runtime.inspect(impostor).status is not InstanceStatus.RUNNING
    assert local_runtime.stop(impostor, grace=0).status is not InstanceStatus.RUNNING
    assert local_runtime.inspect(handle).status is InstanceStatus.RUNNING


def test_memory_limit_stops_a_hungry_process(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}"
    code, lines = run_to_exit(local_runtime, make_spec(["sh", "-c", hog], memory=64 * 2**20))
    assert code != 0
    assert "survived" not in " ".join(line.line for line in lines)


def test_a_small_process_fits_in_the_same_memory_limit(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    spec = make_spec(
        ["sh", "-c", "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo ${#x}"], memory=64 * 2**20
    )
    assert stdout_of(local_runtime, spec) == ["1000000"]


def test_the_cgroup_is_removed_on_destroy(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    spec = make_spec(["sleep", "30"], memory=64 * 2**20, cpu=0.5)
    handle = local_runtime.start(spec)
    cgroup = local_runtime._cgroup(spec.instance_id)
    if cgroup is None:
        pytest.skip("no usable cgroups on this machine (rlimit fallback)")
    assert int(handle.data["sandbox_pid"]) in cgroup.pids()
    local_runtime.destroy(handle)
    assert not any(d.exists() for d in cgroup.dirs)


def test_exec_runs_inside_the_instance_as_its_user(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    if not local_runtime.capabilities.exec:
        pytest.skip("exec needs root and nsenter")
    assert isinstance(local_runtime, Execer)
    spec = make_spec(["sh", "-c", "exec httpd -f -p $PORT -h /www"], user="65534:65534")
    handle = local_runtime.start(spec)
    http_get(spec.port)
    code, output = local_runtime.exec(handle, ["sh", "-c", "hostname; id -u; echo $PORT"], 5)
    assert (code, output.split()) == (0, [spec.instance_id, "65534", str(spec.port)])
    assert local_runtime.exec(handle, ["sh", "-c", "exit 4"], 5)[0] == 4
