"""The shim outlives whoever started it, keeps logging, records the exit, can be adopted,
and passes signals to the app through tini."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_contract import AppSpec
from sandboxes import logs_of

from kiln.observe.logs import LogStore
from kiln.process import proc_start_time
from kiln.runtime import InstanceHandle, InstanceStatus
from kiln.runtime.local import INIT_BINARY, LocalRuntime

STARTER = """
import json, sys
from pathlib import Path
from kiln.runtime import InstanceSpec
from kiln.runtime.local import LocalRuntime
layers = tuple(Path(p) for p in json.loads(sys.argv[3]))
spec = InstanceSpec(**json.loads(sys.argv[2]) | {"layers": layers})
handle = LocalRuntime(Path(sys.argv[1])).start(spec)
print(json.dumps(handle.to_json()), flush=True)
sys.stdin.read()
"""


def test_proc_start_time_reads_field_22_and_is_none_for_a_dead_pid() -> None:
    own = proc_start_time(os.getpid())
    assert own is not None and own > 0
    child = subprocess.Popen(["true"])
    child.wait()
    assert proc_start_time(child.pid) is None


def test_the_instance_outlives_a_killed_agent_and_a_fresh_runtime_adopts_it(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    spec = make_spec(["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"])
    fields = {k: v for k, v in spec.__dict__.items() if k != "layers"}
    layers = json.dumps([str(p) for p in spec.layers])
    agent = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(home), json.dumps(fields), layers],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert agent.stdout is not None
    handle = InstanceHandle.from_json(json.loads(agent.stdout.readline()))
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    killed_at = time.time()
    time.sleep(0.5)

    fresh = LocalRuntime(home)
    assert fresh.recover(handle)
    assert fresh.inspect(handle).status is InstanceStatus.RUNNING
    assert [h.instance_id for h in fresh.list()] == [spec.instance_id]
    assert fresh.list()[0] == handle
    ticks = list(LogStore(home / "logs").read("web", since=killed_at))
    assert len(ticks) >= 2 and all(t.line.startswith("tick ") for t in ticks)
    assert fresh.stop(handle, grace=2).status is InstanceStatus.EXITED


def test_the_shim_records_the_exit_atomically_and_leaves(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    handle = local_runtime.start(make_spec(["sh", "-c", "exit 7"]))
    local_runtime.wait(handle, 10)
    directory = home / "instances" / handle.instance_id
    record = json.loads((directory / "exit.json").read_text())
    assert record["exit_code"] == 7 and record["signal"] is None
    assert record["oom_killed"] is False and "error" not in record
    assert record["finished"] <= time.time()
    assert (directory / "exit.json").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []
    assert proc_start_time(int(handle.data["shim_pid"])) is None
    assert local_runtime.runc.list() == []


def test_term_reaches_the_app_through_the_init_and_its_exit_is_the_signal(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    """``sleep`` has no TERM handler: it dies of TERM at once, never waiting for the grace."""
    handle = local_runtime.start(make_spec(["sleep", "30"]))
    began = time.monotonic()
    state = local_runtime.stop(handle, grace=5)
    assert time.monotonic() - began < 2
    assert state.exit_code == 128 + signal.SIGTERM


@pytest.mark.skipif(not INIT_BINARY.exists(), reason="no tini-static on this machine")
def test_tini_is_pid_one_and_reaps_orphans(local_runtime: LocalRuntime, make_spec: AppSpec) -> None:
    """An app that leaves orphans (as shell scripts do) does not fill the instance with zombies."""
    script = (
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; "
        "for i in 1 2 3; do sh -c 'sleep 0.05 & exit 0'; done; sleep 0.5; "
        "ps -o pid,stat | awk '$2 ~ /Z/' | wc -l"
    )
    spec = make_spec(["sh", "-c", script])
    handle = local_runtime.start(spec)
    assert local_runtime.wait(handle, 10).exit_code == 0
    out = [line.line for line in logs_of(local_runtime, spec) if line.stream == "stdout"]
    assert out[0].startswith("/dev/init -g -- sh -c")
    assert out[1].strip() == "0"


def test_a_stop_right_after_start_stops_the_app_not_its_start(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    """start() returns once the app runs: an immediate stop is an ordinary stop, never a
    failed start (nor a zombie left for init). The race it guards lost about 1 time in 13
    when the shim published its handle before ``runc start``."""
    for _ in range(10):
        spec = make_spec(["sleep", "30"])
        handle = local_runtime.start(spec)
        state = local_runtime.stop(handle, grace=0)
        assert state.status is InstanceStatus.EXITED
        assert state.exit_code in (128 + signal.SIGTERM, 128 + signal.SIGKILL), state
        assert not any("cannot" in line.line for line in logs_of(local_runtime, spec))
