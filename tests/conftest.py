"""Shared by every test package: this directory is on sys.path, so test modules
import the common helpers in ``busybox_tree`` directly."""

import pytest

_SWARM_FIRST = "swarm"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n`` (``--dist loadgroup``, as ``make test`` runs), each test file
    is one unit of work, so its module fixtures are made once, and every test on the
    three-node swarm shares one worker and one cluster. That group, the longest, is
    moved to the front so it starts first. ``serial`` tests (they watch the whole
    host, such as the escape suites' process counts) run in a pass of their own."""
    if not config.pluginmanager.has_plugin("xdist"):
        return
    swarm: list[pytest.Item] = []
    rest: list[pytest.Item] = []
    for item in items:
        on_swarm = "swarm_cluster" in getattr(item, "fixturenames", ())
        group = _SWARM_FIRST if on_swarm else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
        (swarm if on_swarm else rest).append(item)
    items[:] = swarm + rest
