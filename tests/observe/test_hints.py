"""The hints for known failure patterns: each one fires on what the real failure looks
like (the messages are the ones the tools print), and none fires on a healthy log."""

from __future__ import annotations

from kiln.image.hints import step_hints
from kiln.observe.hints import instance_hints


def test_a_literal_port_variable_reaching_the_app() -> None:
    logs = ["Error: invalid port number '$PORT'"]
    (hint,) = instance_hints(8080, 1, "exited with code 1", logs)
    assert "got the text $PORT" in hint and "PORT environment variable" in hint


def test_python3_minimal_without_http_server() -> None:
    logs = [
        "Traceback (most recent call last):",
        '  File "/usr/lib/python3.11/runpy.py", line 189, in _run_module_as_main',
        "ModuleNotFoundError: No module named 'http'",
    ]
    hints = instance_hints(8080, 1, "exited with code 1", logs)
    assert any("python3-minimal" in h and "python3 package" in h for h in hints), hints


def test_a_command_missing_from_the_image() -> None:
    hints = instance_hints(8080, 127, "exited with code 127", ["sh: 1: gunicorn: not found"])
    assert any("not found in the image" in h for h in hints), hints


def test_killed_for_memory() -> None:
    hints = instance_hints(8080, 137, "exited with code 137", [])
    assert any("resources.memory" in h for h in hints), hints


def test_listening_elsewhere_names_the_port_the_log_mentions() -> None:
    reason = "not healthy within healthy_deadline 60s GET /healthz: connection refused"
    logs = ["Serving HTTP on 0.0.0.0 port 8000 (http://0.0.0.0:8000/) ..."]
    (hint,) = instance_hints(40801, None, reason, logs)
    assert "port 40801" in hint and "its log mentions port 8000" in hint


def test_a_health_path_the_app_does_not_serve() -> None:
    hints = instance_hints(8080, None, "GET /healthz: HTTP 404", [])
    assert any("answered 404" in h for h in hints), hints


def test_a_healthy_looking_log_gets_no_hint() -> None:
    assert instance_hints(8080, 0, "stopped", ["listening on 8080", "GET / 200"]) == []


def test_a_run_step_that_needed_the_network() -> None:
    output = [
        "Collecting flask",
        "  WARNING: Retrying after connection broken by 'NewConnectionError(... "
        "Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')",
    ]
    hints = step_hints(1, output, network=False)
    assert any("no network by default" in h and "network = true" in h for h in hints), hints
    assert step_hints(1, output, network=True) == []


def test_a_run_step_that_used_apt() -> None:
    output = ["E: Unable to locate package curl"]
    hints = step_hints(100, [*output, "apt-get install -y curl"], network=False)
    assert any("packages instead" in h for h in hints), hints


def test_a_run_step_whose_command_is_missing() -> None:
    hints = step_hints(127, ["/bin/sh: 1: make: not found"], network=False)
    assert any("not in the image" in h for h in hints), hints
