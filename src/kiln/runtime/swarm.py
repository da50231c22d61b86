"""The Swarm runtime: each instance is a Swarm service of exactly one task, on a
Docker Swarm driven through a manager's Engine API.

Why one service per instance, and not one service per Kiln service: Kiln keeps
every instance's identity and its one-way life. A Swarm service with N replicas
would let Swarm choose which task to replace and would update tasks in place;
here Kiln's planner chooses, and nothing is ever updated: a new revision (or a
replacement for a dead, unhealthy or lost instance) is a new service. Each
service has ``replicas = 1`` and restart condition ``none``, so Swarm never
restarts or reschedules it on its own: a dead task stays dead until Kiln
replaces it, and Swarm may place the replacement on any node.

What lives where:

* images go to the registry of ``[runtime] registry`` (``HOST[:PORT]/PATH``),
  pushed from the home's store by Kiln's own distribution client before the
  instance starts, and are run by digest (``HOST/PATH/SERVICE@sha256:…``);
* the service ``kiln-<home tag>-<instance>``, labelled ``dev.kiln.*`` like the
  docker runtime's containers, on the home's overlay network ``kiln-<home tag>``;
* its address: a port the node publishes in host mode (never Swarm's routing
  mesh, which needs IPVS), on the node's address: probes and the edge proxies
  reach it there;
* secrets: Swarm secrets (kept encrypted in the managers' Raft log), one per
  instance and name, mounted at ``/run/secrets/NAME``;
* logs: a follower per instance copies the service's log stream into the home's
  log store as it comes, so an instance's logs outlive the node it ran on.

Swarm's events API has no task events, so one watcher thread lists the home's
tasks once a second while any instance is watched (:meth:`exit_fd`): one call
for all instances, and nothing at all when none runs. What the manager does
announce near a task's end (a container dying on its own node, a node or
service update), and a failed health check (:meth:`suspect_exit`), switch it to
quick listings for a moment, so a death is seen as soon as the manager records it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import re
import signal as signals
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

from kiln.errors import KilnError
from kiln.image.registry import RegistryOptions, push
from kiln.image.store import ImageStore
from kiln.observe.logs import LogMeta
from kiln.oci.config import capability_name
from kiln.oci.runc import home_tag
from kiln.runtime import (
    HANDLE_VERSION,
    Capabilities,
    DriftExpectation,
    DriftFinding,
    InstanceHandle,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    NotSupported,
    RuntimeFailure,
)
from kiln.runtime.docker import (
    DEFAULT_HOST,
    DEFAULT_TMPFS_SIZE,
    LABEL_HOME,
    LABEL_IMAGE,
    LABEL_INSTANCE,
    LABEL_REVISION,
    LABEL_STOP_GRACE,
    EngineClient,
    LogCopier,
    _check_capabilities,
    _engine_reason,
    log_meta,
)
from kiln.runtime.swarm_nodes import NodeEngines, TaskContainer

__all__ = ["EDGE_CA_SECRET", "EDGE_TOKEN_SECRET", "LABEL_SECRET", "SwarmRuntime"]

LABEL_SECRET = "dev.kiln.secret"
LABEL_EDGE = "dev.kiln.edge"
EDGE_TOKEN_SECRET = "kiln-edge-token"
EDGE_CA_SECRET = "kiln-agent-ca"
EDGE_STATE = "/var/lib/kiln-edge"
EDGE_USER = "65534"
START_TIMEOUT = 180.0
"""The longest a new task may take to be placed, pull its image and run."""
STOP_MARGIN = 15.0
"""Beyond an instance's own grace: the manager tells the node, the node stops the task."""
WATCH_PERIOD = 1.0
"""How often the watcher lists the tasks while an instance is watched: a death is seen
within this (well inside one health interval)."""
START_POLL = 0.05
"""How often a starting task is read: the instance's start (what a recovery and a rollout
wait on) is seen within this of Swarm's, and only while something starts."""
HINT_POLL = 0.1
"""How often the watcher lists the tasks just after the manager announced a change."""
HINT_WINDOW = 2.0
"""How long quick listings follow an event: a task's end reaches the manager within it."""
LOG_DRAIN_TIMEOUT = 5.0
POOL_SIZE = 64
_TERMINAL = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
_STARTING = {"new", "allocated", "pending", "assigned", "accepted", "ready", "preparing"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_REGISTRY = re.compile(
    rf"^{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
"""A host of DNS labels (no ``..``, no leading ``-``), a port, and repository components
as the distribution spec spells them."""
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_NOT_REPOSITORY = re.compile(r"[^a-z0-9]+")


@dataclass
class _Watched:
    handle: InstanceHandle
    fds: list[int]


class SwarmRuntime(EngineClient):
    """One-task services of a Docker Swarm, labelled as this home's.

    ``host`` is a manager's Engine API (None: ``DOCKER_HOST`` or the local socket);
    ``registry`` is where images go for every node to pull; ``nodes`` maps a node (its
    hostname, id or address) to its own Engine API, through which exec, freeze, evidence
    and the file drift check reach a task (:mod:`kiln.runtime.swarm_nodes`); without it
    they are refused. Connects at once: an engine that does not answer, is not in a swarm
    or is not a manager is a RuntimeFailure naming it and what to do.
    """

    name = "swarm"
    engine_title = "the swarm manager"

    def __init__(
        self,
        home: Path,
        host: str | None = None,
        registry: str | None = None,
        registry_options: RegistryOptions | None = None,
        nodes: Mapping[str, str] | None = None,
    ) -> None:
        self.home = home.absolute()
        self.tag = home_tag(self.home)
        self.logs_dir = self.home / "logs"
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        if not registry:
            raise RuntimeFailure(
                "swarm runtime: [runtime] registry is required (for example registry = "
                '"10.0.0.5:5000/kiln"): every node pulls the images from there'
            )
        port = re.search(r":([0-9]+)", registry.partition("/")[0])
        if not _REGISTRY.fullmatch(registry.rstrip("/")) or (port and int(port[1]) > 65535):
            raise RuntimeFailure(
                f"swarm runtime: registry {registry!r} is not HOST[:PORT][/PATH] "
                "(lower-case path components)"
            )
        self.registry = registry.rstrip("/")
        self.registry_options = registry_options or RegistryOptions()
        try:
            self.client: Any = docker.DockerClient(
                base_url=self.host, version="auto", max_pool_size=POOL_SIZE
            )
            info: dict[str, Any] = self.client.api.info()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeFailure(self._unreachable("swarm runtime", e)) from e
        self.api: Any = self.client.api
        self.api_version = str(self.api.api_version)
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active":
            raise RuntimeFailure(
                f"swarm runtime: the docker engine at {self.host} is not in a swarm "
                f"(its state is {swarm.get('LocalNodeState') or 'unknown'}): run "
                "`docker swarm init` there, or point [runtime] host at a manager"
            )
        if not swarm.get("ControlAvailable"):
            raise RuntimeFailure(
                f"swarm runtime: the docker engine at {self.host} is a swarm worker; point "
                "[runtime] host at a manager (`docker node ls` there lists them)"
            )
        self.node_engines = NodeEngines(self.api, nodes, self.tag)
        self.capabilities = Capabilities(
            exec=bool(self.node_engines),
            signal=False,
            volumes=False,
            secrets=True,
            memory_limit=True,
            cpu_limit=True,
            pids_limit=True,
        )
        self._guard = threading.Lock()
        self._image_locks: dict[str, threading.Lock] = {}
        self._pushed: dict[str, str] = {}
        self._network_lock = threading.Lock()
        self._node_addresses: dict[str, str] = {}
        self._followers: dict[str, tuple[LogCopier, threading.Thread]] = {}
        self._watched: dict[str, _Watched] = {}
        self._watch_wake = threading.Event()
        self._watcher: threading.Thread | None = None
        self._hinted_until = 0.0
        self._stopping: set[str] = set()
        """Services this runtime scaled to zero itself: their tasks run until they end."""
        self._hints: threading.Thread | None = None
        self._hint_stream: Any = None
        self._closed = False

    # -- names and errors

    def service_name(self, instance_id: str) -> str:
        return f"kiln-{self.tag}-{instance_id}"

    def network_name(self) -> str:
        return f"kiln-{self.tag}"

    def image_reference(self, service: str, digest: str) -> str:
        """A service name may end in ``.`` or hold ``..``, which no repository name may: runs
        of other characters become one ``-`` (two services sharing a repository share
        nothing else, as images are pulled by digest)."""
        repository = service.lower()
        if not _REPOSITORY.fullmatch(repository):
            repository = _NOT_REPOSITORY.sub("-", repository).strip("-") or "service"
        return f"{self.registry}/{repository}@{digest}"

    def _secret_name(self, instance_id: str, name: str) -> str:
        # Swarm allows 64 characters: a digest of the pair keeps it short and unique.
        key = hashlib.sha256(f"{instance_id}\0{name}".encode()).hexdigest()[:24]
        return f"kiln-{self.tag}-{key}"

    def _unreachable(self, who: str, error: BaseException) -> str:
        return (
            f"{who}: the swarm manager at {self.host} is unreachable ({_engine_reason(error)}): "
            "start it, or point [runtime] host at a reachable manager"
        )

    # -- start

    def _check_spec(self, spec: InstanceSpec) -> None:
        who = f"instance {spec.instance_id}"
        if not _NAME.match(spec.instance_id) or len(self.service_name(spec.instance_id)) > 63:
            raise RuntimeFailure(f"{who}: invalid instance id for a swarm service name")
        self._check_runnable(spec, who)
        if spec.volumes:
            raise RuntimeFailure(
                f"{who}: the swarm runtime has no volumes (a named volume lives on one node, "
                "and Swarm may place the instance on any); keep state in a database or "
                "object store"
            )
        for name in spec.secrets:
            if not _NAME.match(name) or name in (".", ".."):
                raise RuntimeFailure(f"{who}: invalid secret name {name!r}")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", spec.image_digest):
            raise RuntimeFailure(
                f"{who}: image digest {spec.image_digest!r} is not sha256:<64 hex>"
            )
        _check_capabilities(who, spec.cap_add)

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        """Push the image, create the one-task service, wait until its task runs, and
        return the node's address and published port."""
        self._check_spec(spec)
        who = spec.instance_id
        image = self._deliver_image(spec)
        network = self._ensure_network(who)
        service_id: str | None = None
        try:
            secrets = self._create_secrets(spec)
            started = time.time()
            with self._engine(who, "create the service"):
                service_id = self._create(spec, image, network, secrets, started)
            handle = self._wait_running(spec, service_id)
        except BaseException:
            with contextlib.suppress(Exception):
                if service_id is not None:
                    self.api.remove_service(service_id)
                self._remove_secrets(spec.instance_id)
            raise
        meta = LogMeta(spec.service, spec.instance_id, spec.revision, spec.image_digest, started)
        self._follow(service_id, meta)
        return handle

    def _image_lock(self, digest: str) -> threading.Lock:
        with self._guard:
            return self._image_locks.setdefault(digest, threading.Lock())

    def _deliver_image(self, spec: InstanceSpec) -> str:
        """The registry reference of the spec's image, pushed from the home's store once
        per digest (blobs the registry has are skipped)."""
        digest = spec.image_digest
        reference = self.image_reference(spec.service, digest)
        if self._pushed.get(reference):
            return reference
        try:
            return self.publish_image(spec.service, digest)
        except KilnError as e:
            raise RuntimeFailure(f"instance {spec.instance_id}: {e}") from e

    def publish_image(self, service: str, digest: str) -> str:
        """Push ``digest`` with its referrers (SBOM, provenance, signatures) to the
        registry, where the policy gate reads them back (:mod:`kiln.policy.registry_evidence`);
        a push of what the registry has costs a HEAD per blob and referrer."""
        reference = self.image_reference(service, digest)
        with self._image_lock(digest):
            store = ImageStore(self.home / "images")
            try:
                push(store, digest, reference, self.registry_options, referrers=True)
            except KilnError as e:
                raise RuntimeFailure(
                    f"pushing image {digest} to {self.registry} failed: {e}"
                ) from e
            self._pushed[reference] = digest
        return reference

    def _ensure_network(self, who: str) -> str:
        """The home's overlay network, made once and labelled as the home's."""
        name = self.network_name()
        with self._network_lock, self._engine(who, f"create network {name}"):
            for network in self.api.networks(names=[name]):
                if network.get("Name") != name:
                    continue
                if (network.get("Labels") or {}).get(LABEL_HOME) != self.tag:
                    raise RuntimeFailure(
                        f"instance {who}: network {name} exists in the swarm at {self.host} "
                        f"but is not labelled {LABEL_HOME}={self.tag}; remove or rename it"
                    )
                return name
            self.api.create_network(
                name,
                driver="overlay",
                attachable=False,
                check_duplicate=True,
                labels={LABEL_HOME: self.tag},
            )
        return name

    def _create_secrets(self, spec: InstanceSpec) -> builtins.list[Any]:
        """One Swarm secret per name, readable only by the app's user when it is numeric
        (Swarm takes a uid, not a name; a named user gets mode 0444 in its own mount)."""
        uid, gid, mode = "0", "0", 0o444
        user = (spec.user or "").split(":")
        if user[0].isdigit():
            uid, mode = user[0], 0o400
            gid = user[1] if len(user) > 1 and user[1].isdigit() else user[0]
        references = []
        for name, value in spec.secrets.items():
            secret_name = self._secret_name(spec.instance_id, name)
            labels = {LABEL_HOME: self.tag, LABEL_INSTANCE: spec.instance_id, LABEL_SECRET: name}
            with self._engine(spec.instance_id, f"create secret {name}"):
                created = self.api.create_secret(secret_name, value, labels=labels)
            references.append(
                docker.types.SecretReference(
                    str(created["ID"]), secret_name, filename=name, uid=uid, gid=gid, mode=mode
                )
            )
        return references

    def _create(
        self,
        spec: InstanceSpec,
        image: str,
        network: str,
        secrets: builtins.list[Any],
        started: float,
    ) -> str:
        tmpfs_size = spec.memory or DEFAULT_TMPFS_SIZE
        mounts = [
            docker.types.Mount(
                target=path, source=None, type="tmpfs", tmpfs_size=tmpfs_size, tmpfs_mode=0o1777
            )
            for path in ("/tmp", "/run", *spec.writable)
        ]
        labels = self._instance_labels(spec, started)
        container = docker.types.ContainerSpec(
            image,
            command=list(spec.command[:1]),
            args=list(spec.command[1:]),
            hostname=spec.instance_id[:63],
            env=[f"{k}={v}" for k, v in spec.env.items()],
            workdir=spec.workdir or "/",
            user=spec.user or None,
            labels=labels,
            mounts=mounts,
            stop_grace_period=int(spec.stop_grace * 1e9),
            stop_signal="SIGTERM",
            secrets=secrets or None,
            read_only=True,
            init=True,
            cap_drop=["ALL"],
            cap_add=[capability_name(c).removeprefix("CAP_") for c in spec.cap_add] or None,
        )
        resources = docker.types.Resources(
            cpu_limit=round(spec.cpu * 1e9) if spec.cpu is not None else None,
            mem_limit=spec.memory,
        )
        resources.setdefault("Limits", {})["Pids"] = spec.pids
        template = docker.types.TaskTemplate(
            container,
            resources=resources,
            restart_policy=docker.types.RestartPolicy(condition="none"),
            networks=[{"Target": network}],
            log_driver={"Name": "json-file", "Options": {}},
        )
        endpoint = {
            "Mode": "dnsrr",
            "Ports": [{"Protocol": "tcp", "TargetPort": spec.port, "PublishMode": "host"}],
        }
        try:
            created = self.api.create_service(
                template,
                name=self.service_name(spec.instance_id),
                labels=labels,
                mode=docker.types.ServiceMode("replicated", replicas=1),
                endpoint_spec=endpoint,
            )
        except docker.errors.APIError as e:
            if e.status_code == 409:
                raise RuntimeFailure(
                    f"instance {spec.instance_id}: already exists in the swarm at {self.host} "
                    f"(service {self.service_name(spec.instance_id)})"
                ) from e
            raise
        return str(created["ID"])

    def _wait_running(self, spec: InstanceSpec, service_id: str) -> InstanceHandle:
        """Until the service's task runs with its published port, or fails (its error)."""
        who = spec.instance_id
        deadline = time.monotonic() + START_TIMEOUT
        last = "new"
        node_checked = time.monotonic()
        while time.monotonic() < deadline:
            with self._engine(who, "read its task"):
                tasks = self.api.tasks(filters={"service": service_id})
            # One call per poll: whether its node went down is asked once a period.
            check_node = time.monotonic() - node_checked >= WATCH_PERIOD
            if check_node:
                node_checked = time.monotonic()
            for task in tasks:
                status = task.get("Status") or {}
                state = str(status.get("State") or "")
                last = state or last
                if state in _TERMINAL:
                    reason = status.get("Err") or status.get("Message") or state
                    raise RuntimeFailure(f"instance {who}: its task did not start: {reason}")
                if state == "running":
                    handle = self._task_handle(task, spec.instance_id, service_id)
                    if handle is not None:
                        return handle
                node_id = str(task.get("NodeID") or "")
                with self._engine(who, "read its node"):
                    lost = check_node and self._node_down(node_id)
                if lost:
                    # Placed on a node that was lost before the task ran: with restart
                    # condition none Swarm never moves it, so this start fails now and
                    # the caller starts another instance on the nodes that remain.
                    raise RuntimeFailure(
                        f"instance {who}: its node {self._node_address(node_id) or node_id} "
                        "went down before its task ran"
                    )
            time.sleep(START_POLL)
        raise RuntimeFailure(
            f"instance {who}: its task was not running after {START_TIMEOUT:.0f}s (last state "
            f"{last}); see `docker service ps {self.service_name(who)}` on the manager"
        )

    def _node_address(self, node_id: str) -> str:
        with self._guard:
            known = self._node_addresses.get(node_id)
        if known:
            return known
        node = self.api.inspect_node(node_id)
        address = str((node.get("Status") or {}).get("Addr") or "")
        if address:
            with self._guard:
                self._node_addresses[node_id] = address
        return address

    def _task_handle(
        self, task: dict[str, Any], instance_id: str, service_id: str
    ) -> InstanceHandle | None:
        status = task.get("Status") or {}
        ports = (status.get("PortStatus") or {}).get("Ports") or []
        published = next((int(p["PublishedPort"]) for p in ports if p.get("PublishedPort")), 0)
        node_id = str(task.get("NodeID") or "")
        if not published or not node_id:
            return None
        return InstanceHandle(
            version=HANDLE_VERSION,
            runtime=self.name,
            instance_id=instance_id,
            host=self._node_address(node_id),
            port=published,
            data={"service_id": service_id, "task_id": str(task["ID"]), "node_id": node_id},
        )

    # -- logs

    def _follow(self, service_id: str, meta: LogMeta) -> None:
        with self._guard:
            if self._closed:
                return
            current = self._followers.get(service_id)
            if current is not None and current[1].is_alive():
                return
            copier = LogCopier(self, service_id, meta, True, source="/services/{0}/logs")
            thread = threading.Thread(
                target=copier.run, name=f"kiln-logs-{meta.instance}", daemon=True
            )
            self._followers[service_id] = (copier, thread)
            thread.start()

    def _end_follower(self, service_id: str, timeout: float) -> None:
        with self._guard:
            follower = self._followers.pop(service_id, None)
        if follower is None:
            return
        copier, thread = follower
        thread.join(timeout)
        if thread.is_alive():
            copier.cancel()
            thread.join(LOG_DRAIN_TIMEOUT)

    def _drain_logs(self, service: dict[str, Any]) -> None:
        """Swarm never ends a service's follow stream (it waits for more tasks), so waiting
        for the follower would hold every destroy for LOG_DRAIN_TIMEOUT: it is cut at once,
        and a copy without follow, which ends with what the node holds, takes the rest
        (cut after LOG_DRAIN_TIMEOUT when the node does not answer)."""
        service_id = str(service["ID"])
        self._end_follower(service_id, 0.0)
        copier = LogCopier(self, service_id, self._meta(service), False, "/services/{0}/logs")
        thread = threading.Thread(target=copier.run, name="kiln-logs-drain", daemon=True)
        thread.start()
        thread.join(LOG_DRAIN_TIMEOUT)
        if thread.is_alive():
            copier.cancel()
            thread.join(LOG_DRAIN_TIMEOUT)

    # -- state

    def _service(self, handle: InstanceHandle) -> dict[str, Any] | None:
        """The instance's service, or None when it is gone or is not this home's."""
        reference = str(handle.data.get("service_id") or self.service_name(handle.instance_id))
        with self._engine(handle.instance_id, "inspect its service"):
            try:
                service: dict[str, Any] = self.api.inspect_service(reference)
            except docker.errors.NotFound:
                return None
        labels = (service.get("Spec") or {}).get("Labels") or {}
        if labels.get(LABEL_HOME) != self.tag or labels.get(LABEL_INSTANCE) != handle.instance_id:
            return None
        return service

    def _node_down(self, node_id: str) -> bool:
        if not node_id:
            return False
        try:
            node = self.api.inspect_node(node_id)
        except docker.errors.NotFound:
            return True
        return str((node.get("Status") or {}).get("State")) in ("down", "disconnected")

    def _down_nodes(self) -> set[str]:
        """The ids of every node the manager sees down: one call for a whole listing,
        not one per task."""
        return {
            str(n["ID"])
            for n in self.api.nodes()
            if str((n.get("Status") or {}).get("State")) in ("down", "disconnected")
        }

    def _task_state(
        self, task: dict[str, Any] | None, down: set[str] | None = None
    ) -> InstanceState:
        """``down``: the nodes known to be down (from :meth:`_down_nodes`); None asks
        the manager about this task's node alone."""
        if task is None:
            return InstanceState(InstanceStatus.EXITED, None, None)
        status = task.get("Status") or {}
        state = str(status.get("State") or "")
        container = status.get("ContainerStatus") or {}
        if state == "running" or state in _STARTING or state == "starting":
            node_id = str(task.get("NodeID") or "")
            lost = node_id in down if down is not None else self._node_down(node_id)
            if lost:
                return InstanceState(InstanceStatus.EXITED, None, None)
            return InstanceState(
                InstanceStatus.RUNNING, None, int(container.get("PID") or 0) or None
            )
        code = container.get("ExitCode")
        return InstanceState(
            InstanceStatus.EXITED,
            int(code) if code is not None and int(code) >= 0 else None,
            None,
            oom_killed="oom" in str(status.get("Err") or "").lower(),
        )

    def _task(self, handle: InstanceHandle, service: dict[str, Any]) -> dict[str, Any] | None:
        task_id = str(handle.data.get("task_id") or "")
        with self._engine(handle.instance_id, "read its task"):
            tasks = self.api.tasks(filters={"service": service["ID"]})
        for task in tasks:
            if not task_id or task["ID"] == task_id:
                found: dict[str, Any] = task
                return found
        return None

    def inspect(self, handle: InstanceHandle) -> InstanceState:
        """RUNNING while its task runs on a node the manager sees; EXITED once the task
        ended or its node is down (the instance is lost to Kiln either way); GONE when
        the service is. A service scaled to zero behind Kiln's back (not by :meth:`stop`)
        is EXITED at once: Swarm never runs its task again, and its node takes seconds to
        stop it (a task on an overlay network waits 2 s for gossip, then its grace)."""
        self._check_handle(handle)
        service = self._service(handle)
        if service is None:
            return InstanceState(InstanceStatus.GONE, None, None)
        if self._scaled_to_zero(service) and str(service["ID"]) not in self._stopping:
            return InstanceState(InstanceStatus.EXITED, None, None)
        with self._engine(handle.instance_id, "read its node"):
            return self._task_state(self._task(handle, service))

    @staticmethod
    def _scaled_to_zero(service: dict[str, Any]) -> bool:
        mode = ((service.get("Spec") or {}).get("Mode") or {}).get("Replicated") or {}
        return mode.get("Replicas") == 0

    def wait(self, handle: InstanceHandle, timeout: float) -> InstanceState:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            state = self.inspect(handle)
            if state.status is not InstanceStatus.RUNNING or time.monotonic() >= deadline:
                return state
            time.sleep(min(WATCH_PERIOD / 2, max(deadline - time.monotonic(), 0.01)))

    def stop(
        self, handle: InstanceHandle, grace: float, sig: int = signals.SIGTERM
    ) -> InstanceState:
        """Scale the instance's service to zero: Swarm sends SIGTERM and kills after the
        grace the instance started with (a running task's grace cannot change without
        replacing it). Waits for the task to end; a task on a lost node is not waited for."""
        self._check_handle(handle)
        service = self._service(handle)
        if service is None:
            return InstanceState(InstanceStatus.GONE, None, None)
        with self._engine(handle.instance_id, "read its node"):
            state = self._task_state(self._task(handle, service))
        if state.status is not InstanceStatus.RUNNING:
            return state
        with self._guard:
            self._stopping.add(str(service["ID"]))
        with self._engine(handle.instance_id, "scale its service to zero"):
            self.api.update_service(
                service["ID"],
                version=service["Version"]["Index"],
                mode=docker.types.ServiceMode("replicated", replicas=0),
                fetch_current_spec=True,
            )
        labels = (service.get("Spec") or {}).get("Labels") or {}
        own_grace = float(labels.get(LABEL_STOP_GRACE) or 10.0)
        return self.wait(handle, own_grace + STOP_MARGIN)

    def destroy(self, handle: InstanceHandle) -> None:
        """Stop if needed, then remove the service (Swarm removes its container on the
        node, now or when a lost node comes back) and its secrets; logs stay."""
        self._check_handle(handle)
        service = self._service(handle)
        if service is not None:
            if self.inspect(handle).status is InstanceStatus.RUNNING:
                self.stop(handle, 0.0)
            self._drain_logs(service)
            with (
                self._engine(handle.instance_id, "remove its service"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                self.api.remove_service(service["ID"])
            with self._guard:
                self._stopping.discard(str(service["ID"]))
        self._notify(handle.instance_id)
        self._remove_secrets(handle.instance_id)

    def _remove_secrets(self, instance_id: str) -> None:
        filters = {"label": [f"{LABEL_HOME}={self.tag}", f"{LABEL_INSTANCE}={instance_id}"]}
        with self._engine(instance_id, "remove its secrets"):
            for secret in self.api.secrets(filters=filters):
                labels = (secret.get("Spec") or {}).get("Labels") or {}
                if labels.get(LABEL_HOME) == self.tag and labels.get(LABEL_INSTANCE) == instance_id:
                    with contextlib.suppress(docker.errors.NotFound):
                        self.api.remove_secret(secret["ID"])

    def check_drift(
        self, handle: InstanceHandle, expected: DriftExpectation
    ) -> DriftFinding | None:
        """Through the manager: the service and task are the ones started, the service
        was never updated in place (``docker service update``: Kiln's only update is its
        scale to zero when it stops one), and the task's spec runs the revision's image
        by digest with its labels and env. With [runtime] nodes, the task's files too,
        through its node's engine as the docker runtime checks its containers' (its layer
        on this machine, else ``docker diff``); without it they are not checked: the
        manager does not expose them (docs/drift.md)."""
        self._check_handle(handle)
        service = self._service(handle)
        if service is None or service["ID"] != handle.data.get("service_id", service["ID"]):
            return None  # gone, or another service under its name: the watcher's
        task = self._task(handle, service)
        with self._engine(handle.instance_id, "read its node"):
            if self._task_state(task).status is not InstanceStatus.RUNNING:
                return None
        spec = service.get("Spec") or {}
        replicas = ((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas")
        if service.get("PreviousSpec") and replicas != 0:
            return DriftFinding(
                "config",
                f"its service was updated in place at {service.get('UpdatedAt')} "
                f"(version {(service.get('Version') or {}).get('Index')})",
            )
        labels = spec.get("Labels") or {}
        if labels.get(LABEL_IMAGE) != expected.image_digest or labels.get(LABEL_REVISION) != str(
            expected.revision
        ):
            return DriftFinding("config", "its service is labelled with another image or revision")
        container = ((task or {}).get("Spec") or {}).get("ContainerSpec") or {}
        image = str(container.get("Image") or "")
        if not image.endswith("@" + expected.image_digest):
            return DriftFinding(
                "config", f"its task runs {image}, not {expected.image_digest[:19]}…"
            )
        env = dict(str(item).partition("=")[::2] for item in container.get("Env") or [])
        for key, value in sorted(expected.env.items()):
            if env.get(key) != value:
                return DriftFinding("config", f"env {key} is not the revision's")
        if not self.node_engines:
            return None
        found = self._on_node(handle, "read a task's files")
        files = found.engine._written(found.attrs) if found is not None else []
        if files:
            return DriftFinding(
                "files", f"{len(files)} file(s) written into its root", tuple(files)
            )
        return None

    def recover(self, handle: InstanceHandle) -> bool:
        """True iff the service is this home's, its task is the handle's and runs on a
        node the manager sees; then its log follower resumes where the log stops."""
        if handle.runtime != self.name:
            return False
        try:
            service = self._service(handle)
            if service is None:
                return False
            expected = handle.data.get("service_id")
            if expected and service["ID"] != expected:
                return False
            with self._engine(handle.instance_id, "read its task"):
                task = self._task(handle, service)
                if self._task_state(task).status is not InstanceStatus.RUNNING:
                    return False
        except RuntimeFailure:
            return False
        self._follow(str(service["ID"]), self._meta(service))
        return True

    @staticmethod
    def _meta(service: dict[str, Any]) -> LogMeta:
        return log_meta((service.get("Spec") or {}).get("Labels") or {})

    def _services(self) -> builtins.list[dict[str, Any]]:
        """The home's instance services (the edge, which has no instance label, is not one)."""
        with self._engine(None, "list services"):
            found = self.api.services(filters={"label": f"{LABEL_HOME}={self.tag}"})
        # The manager filtered by label already; check again rather than trust a filter.
        return [
            s
            for s in found
            if ((s.get("Spec") or {}).get("Labels") or {}).get(LABEL_HOME) == self.tag
            and LABEL_INSTANCE in ((s.get("Spec") or {}).get("Labels") or {})
        ]

    def _home_tasks(self) -> dict[str, dict[str, Any]]:
        """Service id -> its task (the newest when Swarm made more than one)."""
        with self._engine(None, "list tasks"):
            tasks = self.api.tasks(filters={"label": f"{LABEL_HOME}={self.tag}"})
        newest: dict[str, dict[str, Any]] = {}
        for task in tasks:
            current = newest.get(task["ServiceID"])
            if current is None or task["Version"]["Index"] > current["Version"]["Index"]:
                newest[task["ServiceID"]] = task
        return newest

    def list(self) -> builtins.list[InstanceHandle]:
        """Instances of this home whose task runs on a node the manager sees."""
        tasks = self._home_tasks()
        with self._engine(None, "list nodes"):
            down = self._down_nodes()
        handles = []
        for service in self._services():
            task = tasks.get(service["ID"])
            if task is None:
                continue
            with self._engine(None, "read a node"):
                running = self._task_state(task, down).status is InstanceStatus.RUNNING
                handle = self._task_handle(
                    task, str(service["Spec"]["Labels"][LABEL_INSTANCE]), service["ID"]
                )
            if running and handle is not None:
                handles.append(handle)
        return sorted(handles, key=lambda h: h.instance_id)

    def leftovers(self) -> builtins.list[str]:
        """Instances of this home whose service remains though its task does not run."""
        running = {h.instance_id for h in self.list()}
        instances = {str(s["Spec"]["Labels"][LABEL_INSTANCE]) for s in self._services()}
        return sorted(instances - running)

    def release(self, instance_id: str) -> None:
        """Remove an instance's service and secrets (found by label), keeping its logs."""
        for service in self._services():
            if service["Spec"]["Labels"][LABEL_INSTANCE] == instance_id:
                data = {"service_id": str(service["ID"])}
                handle = InstanceHandle(HANDLE_VERSION, self.name, instance_id, "", 0, data)
                self.destroy(handle)
        self._remove_secrets(instance_id)

    def shutdown(self) -> None:
        """With no instance of the home running: the leftovers and the overlay network."""
        if self.list():
            return
        for instance_id in self.leftovers():
            self.release(instance_id)
        self.remove_edge()
        with self._engine(None, "remove the home's network"):
            for network in self.api.networks(filters={"label": f"{LABEL_HOME}={self.tag}"}):
                if (network.get("Labels") or {}).get(LABEL_HOME) == self.tag:
                    with contextlib.suppress(docker.errors.APIError):
                        self.api.remove_network(network["Id"])

    # -- the edge: Kiln's data plane on every node

    def edge_name(self) -> str:
        return f"kiln-{self.tag}-edge"

    def ensure_edge(self, image_digest: str, agent_url: str, token: bytes, ca_pem: bytes) -> bool:
        """The edge proxy as a global service on every node's host network (a new
        ``listen`` port then needs no change of the service), fed routes by the agent at
        ``agent_url``. Created once; updated node by node (stop-first: a port is a
        node's) when its image, agent or credentials change. True when it changed."""
        reference = self.image_reference("kiln-edge", image_digest)
        with self._image_lock(image_digest):
            if not self._pushed.get(reference):
                try:
                    push(
                        ImageStore(self.home / "images"),
                        image_digest,
                        reference,
                        self.registry_options,
                    )
                except KilnError as e:
                    raise RuntimeFailure(
                        f"edge: pushing image {image_digest} to {self.registry} failed: {e}"
                    ) from e
                self._pushed[reference] = image_digest
        fingerprint = hashlib.sha256(
            b"\0".join([reference.encode(), agent_url.encode(), token, ca_pem])
        ).hexdigest()[:16]
        name = self.edge_name()
        with self._engine(None, f"read service {name}"):
            try:
                current: dict[str, Any] | None = self.api.inspect_service(name)
            except docker.errors.NotFound:
                current = None
        if current is not None:
            labels = (current.get("Spec") or {}).get("Labels") or {}
            if labels.get(LABEL_HOME) != self.tag:
                raise RuntimeFailure(
                    f"edge: service {name} exists in the swarm at {self.host} but is not "
                    f"labelled {LABEL_HOME}={self.tag}; remove or rename it"
                )
            if labels.get(LABEL_EDGE) == fingerprint:
                return False
        secrets = [
            self._edge_secret(EDGE_TOKEN_SECRET, token, fingerprint),
            self._edge_secret(EDGE_CA_SECRET, ca_pem, fingerprint),
        ]
        labels = {LABEL_HOME: self.tag, LABEL_EDGE: fingerprint}
        container = docker.types.ContainerSpec(
            reference,
            env=[
                f"KILN_EDGE_AGENT={agent_url}",
                f"KILN_EDGE_STATE={EDGE_STATE}",
                # Swarm's templates: each node's name and ID (hostnames may repeat).
                "KILN_EDGE_NAME={{.Node.Hostname}}",
                "KILN_EDGE_NODE_ID={{.Node.ID}}",
            ],
            labels=labels,
            mounts=[
                docker.types.Mount(
                    target="/run/kiln", source=None, type="tmpfs", tmpfs_mode=0o1777
                ),
                docker.types.Mount(target="/tmp", source=None, type="tmpfs", tmpfs_mode=0o1777),
                docker.types.Mount(
                    target=EDGE_STATE, source=f"kiln-{self.tag}-edge-state", type="volume"
                ),
            ],
            secrets=secrets,
            read_only=True,
            init=True,
            cap_drop=["ALL"],
            stop_grace_period=int(10e9),
        )
        template = docker.types.TaskTemplate(
            container,
            restart_policy=docker.types.RestartPolicy(condition="any", delay=int(1e9)),
            networks=[{"Target": "host"}],
            log_driver={"Name": "json-file", "Options": {}},
        )
        update = docker.types.UpdateConfig(
            parallelism=1, order="stop-first", failure_action="pause", monitor=int(5e9)
        )
        with self._engine(None, f"create or update service {name}"):
            if current is None:
                self.api.create_service(
                    template,
                    name=name,
                    labels=labels,
                    mode=docker.types.ServiceMode("global"),
                    update_config=update,
                )
            else:
                self.api.update_service(
                    current["ID"],
                    version=current["Version"]["Index"],
                    task_template=template,
                    name=name,
                    labels=labels,
                    mode=docker.types.ServiceMode("global"),
                    update_config=update,
                )
        self._remove_edge_secrets(keep=fingerprint)
        return True

    def _edge_secret(self, name: str, value: bytes, fingerprint: str) -> Any:
        """Secrets cannot change: each version of the edge's settings has its own."""
        secret_name = f"kiln-{self.tag}-{name}-{fingerprint}"
        labels = {LABEL_HOME: self.tag, LABEL_EDGE: fingerprint, LABEL_SECRET: name}
        with self._engine(None, f"create secret {secret_name}"):
            found = [
                s
                for s in self.api.secrets(filters={"name": secret_name})
                if (s.get("Spec") or {}).get("Name") == secret_name
            ]
            secret_id = (
                str(found[0]["ID"])
                if found
                else str(self.api.create_secret(secret_name, value, labels=labels)["ID"])
            )
        return docker.types.SecretReference(
            secret_id, secret_name, filename=name, uid=EDGE_USER, gid=EDGE_USER, mode=0o400
        )

    def _remove_edge_secrets(self, keep: str | None) -> None:
        """Secrets of earlier edge settings (one still in use by a task is refused by
        Swarm and stays until the next change)."""
        with self._engine(None, "remove old edge secrets"):
            for secret in self.api.secrets(filters={"label": f"{LABEL_HOME}={self.tag}"}):
                labels = (secret.get("Spec") or {}).get("Labels") or {}
                edge = labels.get(LABEL_EDGE)
                if labels.get(LABEL_HOME) == self.tag and edge and edge != keep:
                    with contextlib.suppress(docker.errors.APIError):
                        self.api.remove_secret(secret["ID"])

    def remove_edge(self) -> None:
        """The edge service and its secrets (``kiln down``); each node's state volume stays."""
        name = self.edge_name()
        with self._engine(None, f"remove service {name}"):
            try:
                service = self.api.inspect_service(name)
            except docker.errors.NotFound:
                service = None
            if (
                service is not None
                and (service.get("Spec") or {}).get("Labels", {}).get(LABEL_HOME) == self.tag
            ):
                self.api.remove_service(service["ID"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._remove_edge_secrets(keep=None)
            with self._engine(None, "list edge secrets"):
                left = [
                    s
                    for s in self.api.secrets(filters={"label": f"{LABEL_HOME}={self.tag}"})
                    if ((s.get("Spec") or {}).get("Labels") or {}).get(LABEL_EDGE)
                ]
            if not left:
                return
            time.sleep(0.5)

    def edge_nodes(self) -> dict[str, str]:
        """Node address -> the edge task's state there (for status and tests)."""
        with self._engine(None, "list edge tasks"):
            tasks = self.api.tasks(
                filters={"service": self.edge_name(), "desired-state": "running"}
            )
            return {
                self._node_address(str(t.get("NodeID"))): str((t.get("Status") or {}).get("State"))
                for t in tasks
                if t.get("NodeID")
            }

    # -- exits as file descriptors

    def exit_fd(self, handle: InstanceHandle) -> int | None:
        """An eventfd the watcher thread makes readable once the instance stops running."""
        self._check_handle(handle)
        if self.inspect(handle).status is not InstanceStatus.RUNNING:
            return None
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        with self._guard:
            watched = self._watched.setdefault(handle.instance_id, _Watched(handle, []))
            # The watcher writes to a copy of its own: the caller may close theirs any time.
            watched.fds.append(os.dup(fd))
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(
                    target=self._watch, name="kiln-swarm-watch", daemon=True
                )
                self._watcher.start()
        self._watch_wake.set()
        return fd

    def _watch(self) -> None:
        """Lists the home's tasks every WATCH_PERIOD while anything is watched, every
        HINT_POLL for HINT_WINDOW after a hint from the manager's events (:meth:`_hint`);
        ends when nothing is watched. A task on a node the manager sees down is reported
        at the period only, as before hints: its health checks, failing at once, may
        replace it as unhealthy first, and a lost node is not the app's death (which the
        meltdown breaker counts). A manager that does not answer wakes nobody (the
        health checks see what the instances themselves do)."""
        full_listing = 0.0
        while True:
            with self._guard:
                if self._closed or not self._watched:
                    self._watcher = None
                    self._end_hints()
                    return
                watched = list(self._watched.items())
                if self._hints is None or not self._hints.is_alive():
                    self._hints = threading.Thread(
                        target=self._hint, name="kiln-swarm-events", daemon=True
                    )
                    self._hints.start()
            ended: builtins.list[str] = []
            full = time.monotonic() - full_listing >= WATCH_PERIOD
            if full:
                full_listing = time.monotonic()
            with contextlib.suppress(RuntimeFailure, KeyError, TypeError):
                tasks = self._home_tasks()
                with self._engine(None, "list nodes"):
                    down = self._down_nodes()
                for instance_id, entry in watched:
                    service_id = str(entry.handle.data.get("service_id") or "")
                    task = tasks.get(service_id)
                    if task is None or task["ID"] != entry.handle.data.get("task_id"):
                        ended.append(instance_id)
                        continue
                    if not full and str(task.get("NodeID") or "") in down:
                        continue
                    if (  # Swarm was told to end it (not by stop): inspect tells why
                        str(task.get("DesiredState")) in _TERMINAL
                        and str(task.get("ServiceID")) not in self._stopping
                    ):
                        ended.append(instance_id)
                        continue
                    with self._engine(instance_id, "read its node"):
                        if self._task_state(task, down).status is not InstanceStatus.RUNNING:
                            ended.append(instance_id)
            for instance_id in ended:
                self._notify(instance_id)
            hinted = time.monotonic() < self._hinted_until
            self._watch_wake.wait(HINT_POLL if hinted else WATCH_PERIOD)
            self._watch_wake.clear()

    def _hint(self) -> None:
        """Swarm has no task events, but the manager announces what comes with a task's
        end: a container of the home dying on the manager's own node, a node's update (its
        state, or its network attachments when its last task of the home's network ends),
        a service updated or removed. Each opens a window of quick listings (the manager
        records the task's end a few hundred ms after its node saw it); the listing, not
        the event, decides. Ends when the watcher closes the stream, or on any error (the
        watcher opens another within WATCH_PERIOD)."""
        with contextlib.suppress(Exception):
            api = self.new_api()
            try:
                stream = api.events(
                    decode=True,
                    filters={
                        "type": ["container", "node", "service"],
                        "event": ["die", "update", "remove"],
                    },
                )
                with self._guard:
                    if self._closed or self._hints is not threading.current_thread():
                        stream.close()
                        return
                    self._hint_stream = stream
                for event in stream:
                    if self._hints is not threading.current_thread():
                        return
                    attributes = (event.get("Actor") or {}).get("Attributes") or {}
                    if event.get("Type") == "container" and attributes.get(LABEL_HOME) != self.tag:
                        continue
                    self._hinted_until = time.monotonic() + HINT_WINDOW
                    self._watch_wake.set()
            finally:
                api.close()

    def suspect_exit(self, handle: InstanceHandle) -> None:
        """A watched instance failed a health check: quick listings, as after an event."""
        if handle.instance_id in self._watched:
            self._hinted_until = time.monotonic() + HINT_WINDOW
            self._watch_wake.set()

    def _end_hints(self) -> None:
        """Close the event stream under the hint thread (called holding ``_guard``)."""
        stream, self._hint_stream, self._hints = self._hint_stream, None, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def _notify(self, instance_id: str) -> None:
        with self._guard:
            entry = self._watched.pop(instance_id, None)
        for fd in entry.fds if entry is not None else []:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)
            os.close(fd)

    # -- through the node's own engine ([runtime] nodes)

    def _on_node(self, handle: InstanceHandle, doing: str) -> TaskContainer | None:
        """The instance's running task's container, through its node's engine and checked
        as the instance's; None when the instance is gone or no longer runs."""
        self._check_handle(handle)
        if not self.node_engines:
            raise NotSupported(
                f"instance {handle.instance_id}: the swarm runtime cannot {doing} without "
                "[runtime] nodes (each node's Engine API): the manager's has no call for it"
            )
        service = self._service(handle)
        if service is None:
            return None
        task = self._task(handle, service)
        with self._engine(handle.instance_id, "read its node"):
            if task is None or self._task_state(task).status is not InstanceStatus.RUNNING:
                return None
        return self.node_engines.container(handle.instance_id, task, str(service["ID"]))

    def exec(
        self, handle: InstanceHandle, argv: builtins.list[str], timeout: float
    ) -> tuple[int, str]:
        """Run ``argv`` in the task's container through its node's engine (the app's
        user, env and capabilities), as the docker runtime does."""
        found = self._on_node(handle, "exec into a task")
        if found is None:
            raise RuntimeFailure(f"instance {handle.instance_id}: not running, cannot exec")
        return found.engine._exec_in(handle.instance_id, found.id, argv, timeout)

    def freeze(self, handle: InstanceHandle) -> None:
        """``docker pause`` of the task's container on its node. Swarm itself has no pause
        for a task: without [runtime] nodes quarantine keeps the logs and facts, and the
        instance is retired at once."""
        if not self.node_engines:
            raise NotSupported(
                f"instance {handle.instance_id}: the swarm runtime cannot freeze a task "
                "(Swarm has no pause); quarantine keeps its logs only (set [runtime] nodes "
                "to freeze it through its node's engine)"
            )
        found = self._on_node(handle, "freeze a task")
        if found is None:
            raise RuntimeFailure(f"instance {handle.instance_id}: not running, cannot freeze")
        found.engine._pause(handle.instance_id, found.attrs)

    def thaw(self, handle: InstanceHandle) -> None:
        if not self.node_engines:
            raise NotSupported(
                f"instance {handle.instance_id}: the swarm runtime cannot thaw a task"
            )
        found = self._on_node(handle, "thaw a task")
        if found is not None:
            found.engine._unpause(handle.instance_id, found.attrs)

    def collect_evidence(
        self, handle: InstanceHandle, writable: builtins.list[str], into: Path
    ) -> dict[str, Any]:
        """The writable paths, processes and ports of the task's container, read through
        its node's engine as the docker runtime reads its own."""
        if not self.node_engines:
            raise NotSupported(
                f"instance {handle.instance_id}: the swarm runtime cannot read a task's files "
                "without [runtime] nodes (each node's Engine API)"
            )
        found = self._on_node(handle, "read a task's files")
        if found is None:
            raise RuntimeFailure(f"instance {handle.instance_id}: gone, no evidence")
        facts = found.engine._evidence(
            handle.instance_id, found.attrs, handle.address, writable, into
        )
        facts["network"]["node"] = found.engine.node
        return facts

    def close(self) -> None:
        """Stop the log followers, the watcher and the client; instances keep running."""
        with self._guard:
            self._closed = True
            followers = list(self._followers.values())
            self._followers.clear()
            self._end_hints()
        self._watch_wake.set()
        for instance_id in list(self._watched):
            self._notify(instance_id)
        for copier, _ in followers:
            copier.cancel()
        for _, thread in followers:
            thread.join(LOG_DRAIN_TIMEOUT)
        self.node_engines.close()
        self.client.close()
