"""Instance logs: written line by line, read merged, followed, pruned."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.observe.logs import LogLine, LogMeta, LogStore, LogWriter


def meta(instance: str, started: float = 100.0, service: str = "web") -> LogMeta:
    return LogMeta(service, instance, 2, "sha256:" + "ef" * 32, started)


def test_lines_are_read_back_with_stream_and_timestamp(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    with LogWriter(store, meta("web-a")) as writer:
        writer.write("stdout", "hello", ts=1.0)
        writer.write("stderr", "oops ünïcode", ts=2.0)
    assert list(store.read("web", "web-a")) == [
        LogLine(1.0, "web-a", "stdout", "hello"),
        LogLine(2.0, "web-a", "stderr", "oops ünïcode"),
    ]


def test_instances_are_merged_by_time_and_filtered_by_since(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    a, b = store.writer(meta("web-a")), store.writer(meta("web-b", 101.0))
    a.write("stdout", "a1", ts=1.0)
    b.write("stdout", "b1", ts=2.0)
    a.write("stdout", "a2", ts=3.0)
    assert [line.line for line in store.read("web")] == ["a1", "b1", "a2"]
    assert [line.line for line in store.read("web", since=2.0)] == ["b1", "a2"]
    assert [m.instance for m in store.instances("web")] == ["web-a", "web-b"]
    assert store.instances("web")[0] == meta("web-a")


def test_a_half_written_line_is_not_returned(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    store.writer(meta("web-a")).write("stdout", "whole", ts=1.0)
    with (tmp_path / "web" / "web-a.log").open("a") as f:
        f.write('{"ts": 2.0, "stream": "stdout", "li')
    assert [line.line for line in store.read("web")] == ["whole"]


def test_unknown_service_and_instance_name_what_exists(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    store.writer(meta("web-a"))
    with pytest.raises(KilnError, match=r"no service 'api' .*\(known: web\)"):
        list(store.read("api"))
    with pytest.raises(KilnError, match=r"no instance 'web-z' \(known: web-a\)"):
        list(store.read("web", "web-z"))
    with pytest.raises(KilnError, match="unknown stream"):
        store.writer(meta("web-b")).write("stdin", "x")


def test_follow_tails_new_lines_and_new_instances_until_stopped(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    store.writer(meta("web-a")).write("stdout", "old", ts=1.0)
    stop = threading.Event()
    seen: list[str] = []

    def consume() -> None:
        for line in store.follow("web", stop=stop, poll=0.02):
            seen.append(line.line)

    thread = threading.Thread(target=consume)
    thread.start()
    writer_a = store.writer(meta("web-a"))
    writer_b = store.writer(meta("web-b"))
    time.sleep(0.1)
    writer_a.write("stdout", "new-a")
    writer_b.write("stderr", "new-b")
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert seen == ["old", "new-a", "new-b"]


def test_follow_with_since_skips_older_lines(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    writer = store.writer(meta("web-a"))
    writer.write("stdout", "before", ts=1.0)
    writer.write("stdout", "after", ts=5.0)
    lines = list(store.follow("web", "web-a", since=2.0, stop=lambda: True))
    assert [line.line for line in lines] == ["after"]


def test_prune_deletes_old_and_oversized_logs_of_gone_instances_only(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    now = 10_000.0
    for name, age in (("web-old", 5000), ("web-mid", 300), ("web-new", 100), ("web-live", 9000)):
        writer = store.writer(meta(name))
        writer.write("stdout", "x" * 100, ts=now - age)
        writer.close()
        os.utime(tmp_path / "web" / f"{name}.log", (now - age, now - age))
    assert store.prune(10**6, max_age=3600, live={"web-live"}, now=now) == 1
    assert sorted(m.instance for m in store.instances("web")) == ["web-live", "web-mid", "web-new"]
    line_bytes = (tmp_path / "web" / "web-new.log").stat().st_size
    assert store.prune(2 * line_bytes, max_age=3600, live={"web-live"}, now=now) == 1
    assert sorted(m.instance for m in store.instances("web")) == ["web-live", "web-new"]
    assert not (tmp_path / "web" / "web-mid.json").exists()


def test_logs_are_owner_only(tmp_path: Path) -> None:
    """Apps print secrets too: directories 0700, logs and metadata 0600, whatever the umask."""
    old_umask = os.umask(0o022)
    try:
        store = LogStore(tmp_path / "logs")
        with LogWriter(store, meta("web-a")) as writer:
            writer.write("stdout", "token=hunter2")
    finally:
        os.umask(old_umask)
    for path in [tmp_path / "logs", *(tmp_path / "logs").rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, path
    assert {p.name for p in (tmp_path / "logs" / "web").iterdir()} == {"web-a.log", "web-a.json"}


def test_an_older_world_readable_log_is_tightened(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    (tmp_path / "web").mkdir()
    old = tmp_path / "web" / "web-a.log"
    old.write_text("")
    old.chmod(0o644)
    with LogWriter(store, meta("web-a")) as writer:
        writer.write("stdout", "x")
    assert old.stat().st_mode & 0o777 == 0o600
