"""The shim outlives whoever started it, keeps logging, and can be adopted again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runtime_contract import AppSpec

from kiln.observe.logs import LogStore
from kiln.process import proc_start_time
from kiln.runtime import InstanceHandle, InstanceStatus
from kiln.runtime.local import LocalRuntime
from kiln.runtime.shim import app_pids

STARTER = """
import json, sys
from pathlib import Path
from kiln.runtime import InstanceSpec
from kiln.runtime.local import LocalRuntime
spec = InstanceSpec(**json.loads(sys.argv[2]) | {"rootfs": Path(sys.argv[3])})
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
    fields = {k: v for k, v in spec.__dict__.items() if k != "rootfs"}
    agent = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(home), json.dumps(fields), str(spec.rootfs)],
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
    ticks = [line for line in LogStore(home / "logs").read("web", since=killed_at)]
    assert len(ticks) >= 2 and all(t.line.startswith("tick ") for t in ticks)
    assert fresh.stop(handle, grace=2).status is InstanceStatus.EXITED


def test_the_shim_records_the_exit_atomically_and_leaves(
    local_runtime: LocalRuntime, make_spec: AppSpec, home: Path
) -> None:
    handle = local_runtime.start(make_spec(["sh", "-c", "exit 7"]))
    local_runtime.wait(handle, 10)
    record = json.loads((home / "instances" / handle.instance_id / "exit.json").read_text())
    assert record["exit_code"] == 7 and record["signal"] is None
    assert record["finished"] <= time.time()
    assert proc_start_time(handle.pid) is None


def test_term_reaches_the_apps_process_group_not_just_pid_one(
    local_runtime: LocalRuntime, make_spec: AppSpec
) -> None:
    handle = local_runtime.start(make_spec(["sleep", "30"]))
    deadline = time.monotonic() + 5
    while not app_pids(int(handle.data["sandbox_pid"])) and time.monotonic() < deadline:
        time.sleep(0.02)
    began = time.monotonic()
    state = local_runtime.stop(handle, grace=5)
    assert time.monotonic() - began < 2
    assert state.exit_code == 128 + signal.SIGTERM
