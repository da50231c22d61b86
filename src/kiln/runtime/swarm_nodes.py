"""Each swarm node's own Engine API (``[runtime] nodes``): what a manager's API has no
call for — exec into a task, pause it, read its files — done by the engine of the node
that runs the task, as Portainer's agent or Nomad's clients act on each node.

Nothing a node's engine says is taken on trust. The manager says which node runs a
task and which container is the task's; before anything is done, the engine at the
address ``nodes`` gives for that node must say it is that node (its swarm node id), and
the container must carry this home's label, the instance's id and the task's, service's
and node's ids that Swarm puts on it. A wrong or hostile entry in ``nodes`` (an engine
of another node, or one that is no node at all) therefore makes Kiln refuse, never act
on a container that is not the instance's.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.constants import MINIMUM_DOCKER_API_VERSION

from kiln.runtime import NotSupported, RuntimeFailure
from kiln.runtime.docker import (
    LABEL_HOME,
    LABEL_INSTANCE,
    EngineClient,
    _engine_reason,
    _within,
)

__all__ = ["NodeEngine", "NodeEngines", "TaskContainer"]

LABEL_SWARM_TASK = "com.docker.swarm.task.id"
LABEL_SWARM_SERVICE = "com.docker.swarm.service.id"
LABEL_SWARM_NODE = "com.docker.swarm.node.id"
NODE_TIMEOUT = 30.0
"""Seconds a call to a node's engine may take in all (an exec brings its own)."""
ARCHIVE_TIMEOUT = 300.0
"""Seconds one writable path's archive from a node's engine may take in all (256 MiB
at under 1 MiB/s); past it the path is listed as refused."""
NODE_ANSWER_MAX = 64 * 1024**2
"""Bytes one answer of a node's engine may hold (an archive or an exec's output, read
as a stream, has its own bound): a container's inspect or ``docker top`` is kilobytes,
and a hostile engine must not fill the agent's memory with one."""
_CONTAINER_ID = re.compile(r"^[0-9a-f]{64}$")


class _CappedBody:
    """A response's body that raises once more than ``limit`` bytes came."""

    def __init__(self, raw: Any, limit: int) -> None:
        self._raw = raw
        self._limit = limit

    def stream(self, amt: int, decode_content: bool | None = None) -> Iterator[bytes]:
        seen = 0
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            seen += len(chunk)
            if seen > self._limit:
                raise requests.exceptions.RequestException(
                    f"its answer is larger than {self._limit} bytes"
                )
            yield chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _bounded_answer(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    """A response hook: an answer read whole (not streamed) holds at most
    ``NODE_ANSWER_MAX`` bytes, declared or not."""
    if kwargs.get("stream"):
        return
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > NODE_ANSWER_MAX:
        response.close()
        raise requests.exceptions.RequestException(
            f"its answer is larger than {NODE_ANSWER_MAX} bytes"
        )
    response.raw = _CappedBody(response.raw, NODE_ANSWER_MAX)


class _WithinTimeout:
    """A node engine's client whose every call ends within ``seconds`` in all (see
    ``kiln.runtime.docker._within``); what it streams is bounded by its reader (an
    archive by ``archive_timeout``, an exec's output by its timeout)."""

    def __init__(self, api: Any, seconds: float) -> None:
        self._api = api
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._api, name)
        if not callable(attr) or name == "close":
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return _within(self._seconds, lambda: attr(*args, **kwargs))

        return call


class NodeEngine(EngineClient):
    """One node's Engine API, as the docker runtime's shared container code needs it
    (pause, evidence, exec, the layer's changes)."""

    name = "swarm"
    engine_title = "the engine of a swarm node"
    archive_timeout = ARCHIVE_TIMEOUT

    def __init__(self, tag: str, node: str, host: str) -> None:
        self.tag = tag
        self.node = node
        self.host = host
        self.local_engine = host.startswith("unix://")
        self.engine_title = f"the engine of swarm node {node}"
        try:
            api = _within(NODE_TIMEOUT, lambda: self._client(host))
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeFailure(self._unreachable("swarm runtime", e)) from e
        self.api = _WithinTimeout(api, NODE_TIMEOUT)
        self.api_version = str(api.api_version)

    @staticmethod
    def _client(host: str) -> Any:
        """A client whose answers are bounded (``NODE_ANSWER_MAX``) from its first call
        (``version="auto"`` asks the engine's version)."""
        asking = docker.APIClient(
            base_url=host, version=MINIMUM_DOCKER_API_VERSION, timeout=NODE_TIMEOUT
        )
        try:
            asking.hooks["response"].append(_bounded_answer)
            version = str(asking.version(api_version=False)["ApiVersion"])
        finally:
            asking.close()
        api = docker.APIClient(base_url=host, version=version, timeout=NODE_TIMEOUT)
        api.hooks["response"].append(_bounded_answer)
        return api

    def _unreachable(self, who: str, error: BaseException) -> str:
        return (
            f"{who}: the engine of swarm node {self.node} at {self.host} is unreachable "
            f"({_engine_reason(error)}): start it, or fix its address in [runtime] nodes"
        )

    def node_id(self) -> str:
        """The swarm node id this engine says it is ("" when it is in no swarm)."""
        with self._engine(None, f"ask the engine at {self.host} which node it is"):
            info: dict[str, Any] = self.api.info()
        return str((info.get("Swarm") or {}).get("NodeID") or "")

    def close(self) -> None:
        self.api.close()


@dataclass(frozen=True)
class TaskContainer:
    """A task's container, checked as the instance's, and the engine of its node."""

    engine: NodeEngine
    attrs: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.attrs["Id"])


class NodeEngines:
    """The engines of ``nodes`` (a node's hostname, id or address → its engine's address),
    opened on first use and kept; each one's node id is checked once."""

    def __init__(self, manager_api: Any, nodes: Mapping[str, str] | None, tag: str) -> None:
        self.manager_api = manager_api
        self.nodes = dict(nodes or {})
        self.tag = tag
        self._guard = threading.Lock()
        self._engines: dict[str, NodeEngine] = {}
        self._verified: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.nodes)

    def _describe(self, who: str, node_id: str) -> tuple[str, str]:
        """(the entry of ``nodes`` for the node, how messages name the node)."""
        try:
            node: dict[str, Any] = self.manager_api.inspect_node(node_id)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeFailure(
                f"{who}: the swarm manager did not describe node {node_id[:12]}: "
                f"{_engine_reason(e)}"
            ) from e
        hostname = str((node.get("Description") or {}).get("Hostname") or "")
        address = str((node.get("Status") or {}).get("Addr") or "")
        named = f"{hostname or node_id[:12]} ({address or 'no address'}, id {node_id[:12]})"
        for key in (node_id, hostname, address):
            if key and key in self.nodes:
                return key, named
        raise NotSupported(
            f"{who}: its task runs on swarm node {named}, which [runtime] nodes does not "
            f'list; add "{hostname or node_id}" = "tcp://…" (the address of that node\'s '
            "Engine API) to reach it"
        )

    def engine(self, who: str, node_id: str) -> NodeEngine:
        """The engine of the node ``node_id``, once it said it is that node."""
        key, named = self._describe(who, node_id)
        host = self.nodes[key]
        with self._guard:
            engine = self._engines.get(host)
            verified = self._verified.get(host)
        if engine is None:
            engine = NodeEngine(self.tag, named, host)
            with self._guard:
                engine = self._engines.setdefault(host, engine)
        if verified != node_id:
            actual = engine.node_id()
            if actual != node_id:
                raise RuntimeFailure(
                    f"{who}: [runtime] nodes gives {host} for swarm node {named}, but the "
                    f"engine there is {f'node {actual[:12]}' if actual else 'in no swarm'}; "
                    "nothing was done: fix the address in [runtime] nodes"
                )
            with self._guard:
                self._verified[host] = node_id
        return engine

    def container(self, instance_id: str, task: dict[str, Any], service_id: str) -> TaskContainer:
        """The running task's container on its node, checked as the instance's: this
        home's label, the instance's id and Swarm's task, service and node ids."""
        who = f"instance {instance_id}"
        node_id = str(task.get("NodeID") or "")
        status = task.get("Status") or {}
        container_id = str((status.get("ContainerStatus") or {}).get("ContainerID") or "")
        if not node_id or not _CONTAINER_ID.match(container_id):
            raise RuntimeFailure(f"{who}: its task has no container on a node yet")
        engine = self.engine(who, node_id)
        with engine._engine(instance_id, f"inspect container {container_id[:12]}"):
            try:
                attrs: dict[str, Any] = engine.api.inspect_container(container_id)
            except docker.errors.NotFound:
                raise RuntimeFailure(
                    f"{who}: its container {container_id[:12]} is not on swarm node {engine.node}"
                ) from None
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        expected = {
            LABEL_HOME: self.tag,
            LABEL_INSTANCE: instance_id,
            LABEL_SWARM_TASK: str(task.get("ID") or ""),
            LABEL_SWARM_SERVICE: service_id,
            LABEL_SWARM_NODE: node_id,
        }
        wrong = sorted(k for k, v in expected.items() if not v or labels.get(k) != v)
        if wrong or str(attrs.get("Id") or "") != container_id:
            raise RuntimeFailure(
                f"{who}: container {container_id[:12]} on swarm node {engine.node} is not "
                f"this home's task of the instance (labels {', '.join(wrong) or 'Id'} differ); "
                "nothing was done"
            )
        return TaskContainer(engine, attrs)

    def close(self) -> None:
        with self._guard:
            engines = list(self._engines.values())
            self._engines.clear()
            self._verified.clear()
        for engine in engines:
            engine.close()
