"""kiln.process: how every layer judges a pid it recorded earlier."""

from __future__ import annotations

import os
import subprocess
import sys

from kiln.process import pid_alive, proc_start_time


def test_a_live_process_and_its_mark() -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(os.getpid(), mark="python")
    assert not pid_alive(os.getpid(), mark="no-such-program-name")
    start = proc_start_time(os.getpid())
    assert start is not None and start == proc_start_time(os.getpid())


def test_a_reaped_process_and_a_zombie_are_not_alive() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert not pid_alive(done.pid) and proc_start_time(done.pid) is None
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while True:
        with open(f"/proc/{zombie.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
    assert not pid_alive(zombie.pid) and proc_start_time(zombie.pid) is None
    zombie.wait()
