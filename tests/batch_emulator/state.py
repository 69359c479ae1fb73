"""Pools and compute nodes of one emulated Batch account, and the clock that moves them.

Everything that Batch does asynchronously happens here, on a ticker thread, so that the HTTP
thread only records a request and answers it (202 for resize, remove and delete, as Batch
does) and the SDK's pollers see the same in-between states they see on Azure:

- a resize sets ``allocationState`` to ``resizing``; each tick allocates the missing nodes (as
  far as the account's core quota allows and unless allocations are made to stall), which
  appear as ``creating``; the pool is ``steady`` again once no node is ``creating`` or
  ``leavingpool`` and the node counts reached the targets, or the quota stopped the
  allocation (``AccountCoreQuotaReached`` / ``AccountLowPriorityCoreQuotaReached``), or the
  resize timeout passed while allocations stalled (``AllocationTimedout``);
- a node goes ``creating`` -> ``starting`` -> (``waitingforstarttask`` while its start task
  runs, when ``waitForSuccess``) -> ``idle``, or ``starttaskfailed`` once the start task and
  its ``maxTaskRetryCount`` retries have all exited non-zero; each step takes
  ``node_start_delay`` seconds, plus however long the start task runs;
- a node being removed is ``leavingpool``: its processes are killed at once and it disappears
  once they are all gone and ``node_start_delay`` passed;
- a deleted pool is ``deleting`` while its nodes leave, then gone (404).

Simplifications (cloudmap runs no Batch jobs or tasks): ``nodeDeallocationOption`` is
accepted and recorded but every option removes nodes at once; autoscale formulas are
evaluated only when the target variables are assigned integer constants (or variables holding
them), once when autoscale is enabled and on ``evaluateautoscale``, never on a timer.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path
from typing import Any

import isodate

from .endpoints import Connection, EndpointError, Forwarder, NatPool, nat_pools
from .network import LoopbackNetwork
from .nodes import Attempt, NodeProcesses, StartTaskSpec

#: The variable that tells a node's processes the one address they may listen on
#: (cloudmap.node.slot reads it; on a real VM it is unset and Dask picks the VM's address).
NODE_HOST_VARIABLE = "CLOUDMAP_NODE_HOST"

#: Cores per VM size (lower-cased), for the core quotas; other sizes count 2 cores.
CORES_PER_VM_SIZE = {"standard_d2s_v5": 2, "standard_d4s_v5": 4, "standard_d8s_v5": 8}
DEFAULT_CORES = 2

DEFAULT_RESIZE_TIMEOUT = "PT15M"
DEFAULT_AUTOSCALE_INTERVAL = "PT15M"

#: Batch documents a 409 for resizing a pool that autoscales but not its error code; this is
#: the generic code Batch publishes for "not valid for the current state of the resource".
AUTOSCALE_RESIZE_CONFLICT = "OperationInvalidForCurrentState"

#: States a node record made by ``add_fake_nodes`` may be put in.
FAKE_NODE_STATES = frozenset(
    {"creating", "starting", "idle", "running", "starttaskfailed", "unusable", "preempted"}
)

_POOL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: Order in which a shrinking pool gives up its nodes: broken and unfinished ones first.
_REMOVAL_ORDER = {
    "preempted": 0,
    "starttaskfailed": 1,
    "unusable": 2,
    "creating": 3,
    "starting": 4,
    "waitingforstarttask": 5,
    "idle": 6,
}

#: Properties of the create body returned as they were sent (Batch echoes its pool spec).
_ECHOED = (
    "displayName",
    "virtualMachineConfiguration",
    "networkConfiguration",
    "startTask",
    "applicationPackageReferences",
    "userAccounts",
    "mountConfiguration",
    "upgradePolicy",
)


class BatchError(Exception):
    """A Batch error response: HTTP status, error code, message, key/value details and
    extra response headers (``Retry-After``)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        values: dict[str, str] | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.values = values or {}
        self.headers = headers or {}


def cores_of(vm_size: str) -> int:
    return CORES_PER_VM_SIZE.get(vm_size.lower(), DEFAULT_CORES)


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds")[:-6] + "Z"


def rfc1123(t: float) -> str:
    return formatdate(t, usegmt=True)


def _duration(body: dict[str, Any], name: str, default: str) -> tuple[str, float]:
    """An ISO 8601 duration property: (as sent, in seconds); 400 if malformed."""
    raw = body.get(name)
    if raw is None:
        raw = default
    try:
        seconds = isodate.parse_duration(raw).total_seconds()
    except (isodate.ISO8601Error, TypeError, ValueError, AttributeError) as exc:
        raise invalid(name, raw, "not an ISO 8601 duration") from exc
    return raw, seconds


def missing(name: str) -> BatchError:
    return BatchError(
        400,
        "MissingRequiredProperty",
        "A required property was not specified in the request body.",
        {"PropertyName": name},
    )


def invalid(name: str, value: Any, reason: str) -> BatchError:
    return BatchError(
        400,
        "InvalidPropertyValue",
        "The value provided for one of the properties in the request body is invalid.",
        {"PropertyName": name, "PropertyValue": str(value), "Reason": reason},
    )


def _count(body: dict[str, Any], name: str) -> int:
    value = body.get(name, 0)
    if value is None:
        value = 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise invalid(name, value, "must be a non-negative integer")
    return value


class Node:
    """One compute node: its Batch state and, once it boots, its processes."""

    def __init__(self, pool: Pool, dedicated: bool, now: float, delay: float, address: str) -> None:
        self.pool = pool
        self.dedicated = dedicated
        #: The node's own address (its VM's private IP): a loopback address of its own.
        self.address = address
        #: Which port of each NAT pool's frontend range is this node's (Batch: one each).
        self.nat_offset = pool.free_nat_offset()
        self.forwarders: list[Forwarder] = []
        self.id = f"tvmps_{secrets.token_hex(32)}_{'d' if dedicated else 'p'}"
        self.state = "creating"
        self.state_time = now
        self.allocation_time = now
        self.boot_time: float | None = None
        self.next_at = now + delay  # when the current timed state ends
        self.start_task_info: dict[str, Any] | None = None
        self.processes: NodeProcesses | None = None
        #: A record only (``add_fake_nodes``): it keeps its state and runs no process.
        self.fake = False

    def set_state(self, state: str, now: float) -> None:
        if state != self.state:
            self.state, self.state_time = state, now

    def to_json(self, base_url: str) -> dict[str, Any]:
        spec = self.pool.spec
        body: dict[str, Any] = {
            "id": self.id,
            "url": f"{base_url}/pools/{self.pool.id}/nodes/{self.id}",
            "state": self.state,
            "schedulingState": "enabled",
            "stateTransitionTime": rfc3339(self.state_time),
            "allocationTime": rfc3339(self.allocation_time),
            "ipAddress": self.address,
            "affinityId": f"TVM:{self.id}",
            "vmSize": self.pool.vm_size,
            "totalTasksRun": 0,
            "runningTasksCount": 0,
            "runningTaskSlotsCount": 0,
            "totalTasksSucceeded": 0,
            "isDedicated": self.dedicated,
            "nodeAgentInfo": {"version": "emulator", "lastUpdateTime": rfc3339(self.pool.created)},
        }
        if self.boot_time is not None:
            body["lastBootTime"] = rfc3339(self.boot_time)
        vm_config = spec.get("virtualMachineConfiguration") or {}
        if "imageReference" in vm_config:
            body["virtualMachineInfo"] = {"imageReference": vm_config["imageReference"]}
        if spec.get("startTask"):
            body["startTask"] = spec["startTask"]
        if self.start_task_info is not None:
            body["startTaskInfo"] = dict(self.start_task_info)
        if self.pool.nat_pools:
            body["endpointConfiguration"] = {"inboundEndpoints": self.endpoints()}
        return body

    def endpoints(self) -> list[dict[str, Any]]:
        """Batch's ``inboundEndpoints``: where each NAT pool reaches this node from outside."""
        return [
            {
                "name": f"{nat.name}.{self.nat_offset}",
                "protocol": nat.protocol,
                "publicIPAddress": self.pool.public_address,
                "publicFQDN": f"{self.pool.id.lower()}.emulator.batch.local",
                "frontendPort": nat.frontend_start + self.nat_offset,
                "backendPort": nat.backend_port,
            }
            for nat in self.pool.nat_pools
        ]

    def open_endpoints(self) -> None:
        """Start forwarding each endpoint's frontend port to this node (as it boots)."""
        for nat in self.pool.nat_pools:
            frontend = (self.pool.public_address, nat.frontend_start + self.nat_offset)
            forwarder = Forwarder(frontend, (self.address, nat.backend_port), nat)
            self.forwarders.append(forwarder)
            self.pool.forwarders.append(forwarder)
            self.pool.account_forwarders.append(forwarder)

    def close_endpoints(self) -> None:
        for forwarder in self.forwarders:
            forwarder.close()
        self.forwarders = []


class Pool:
    """One pool: its spec as created, its targets, its resize in progress and its nodes."""

    def __init__(
        self,
        body: dict[str, Any],
        now: float,
        nats: tuple[NatPool, ...],
        public_address: str,
        account_forwarders: list[Forwarder],
    ) -> None:
        self.id: str = body["id"]
        self.spec = body
        self.nat_pools = nats
        self.public_address = public_address
        #: Every frontend the pool's nodes had, removed nodes' too: their connection logs.
        self.forwarders: list[Forwarder] = []
        #: The account's list of every frontend, deleted pools' too.
        self.account_forwarders = account_forwarders
        self.vm_size: str = body["vmSize"]
        self.created = now
        self.state = "active"
        self.state_time = now
        self.allocation_state = "steady"
        self.allocation_time = now
        self.target_dedicated = 0
        self.target_low = 0
        self.resize_timeout_iso = DEFAULT_RESIZE_TIMEOUT
        self.resize_timeout = 900.0
        self.resize_started = now
        self.resize_errors: list[dict[str, Any]] = []
        self.stopping = False
        self.blocked = {True: False, False: False}  # dedicated? -> quota or timeout ended it
        self.deallocation_option = "requeue"
        self.autoscale = bool(body.get("enableAutoScale"))
        self.formula: str | None = body.get("autoScaleFormula")
        self.interval_iso: str | None = None
        self.autoscale_run: dict[str, Any] | None = None
        self.metadata: list[dict[str, str]] = list(body.get("metadata") or [])
        self.nodes: dict[str, Node] = {}
        self.etag = ""
        self.last_modified = now
        self.touch(now)

    def touch(self, now: float) -> None:
        self.etag = f"0x{secrets.token_hex(7).upper()}"
        self.last_modified = now

    def set_allocation_state(self, state: str, now: float) -> None:
        if state != self.allocation_state:
            self.allocation_state, self.allocation_time = state, now
            self.touch(now)

    def free_nat_offset(self) -> int:
        """The lowest frontend port offset no node of the pool holds."""
        held = {n.nat_offset for n in self.nodes.values()}
        return next(i for i in range(len(held) + 1) if i not in held)

    def connections(self) -> list[Connection]:
        return sorted((c for f in self.forwarders for c in f.log), key=lambda c: c.time)

    def counted(self, dedicated: bool) -> list[Node]:
        """Nodes of one priority that count towards the target (all but those leaving)."""
        return [
            n for n in self.nodes.values() if n.dedicated is dedicated and n.state != "leavingpool"
        ]

    def start_resize(
        self, dedicated: int, low: int, timeout: tuple[str, float], now: float
    ) -> None:
        self.target_dedicated, self.target_low = dedicated, low
        self.resize_timeout_iso, self.resize_timeout = timeout
        self.resize_started = now
        self.resize_errors = []
        self.blocked = {True: False, False: False}
        self.stopping = False
        self.set_allocation_state("resizing", now)
        self.touch(now)

    def to_json(self, base_url: str) -> dict[str, Any]:
        nodes = list(self.nodes.values())
        body: dict[str, Any] = {
            "id": self.id,
            "url": f"{base_url}/pools/{self.id}",
            "eTag": self.etag,
            "lastModified": rfc3339(self.last_modified),
            "creationTime": rfc3339(self.created),
            "state": self.state,
            "stateTransitionTime": rfc3339(self.state_time),
            "allocationState": self.allocation_state,
            "allocationStateTransitionTime": rfc3339(self.allocation_time),
            "vmSize": self.vm_size,
            "resizeTimeout": self.resize_timeout_iso,
            "currentDedicatedNodes": sum(n.dedicated for n in nodes),
            "currentLowPriorityNodes": sum(not n.dedicated for n in nodes),
            "targetDedicatedNodes": self.target_dedicated,
            "targetLowPriorityNodes": self.target_low,
            "enableAutoScale": self.autoscale,
            "enableInterNodeCommunication": bool(self.spec.get("enableInterNodeCommunication")),
            "taskSlotsPerNode": self.spec.get("taskSlotsPerNode") or 1,
            "taskSchedulingPolicy": self.spec.get("taskSchedulingPolicy")
            or {"nodeFillType": "spread"},
        }
        for name in _ECHOED:
            if self.spec.get(name) is not None:
                body[name] = self.spec[name]
        if self.metadata:
            body["metadata"] = self.metadata
        if self.autoscale:
            body["autoScaleFormula"] = self.formula
            body["autoScaleEvaluationInterval"] = self.interval_iso
            if self.autoscale_run is not None:
                body["autoScaleRun"] = self.autoscale_run
        if self.allocation_state == "steady" and self.resize_errors:
            body["resizeErrors"] = self.resize_errors
        return body


def _quota_error(dedicated: bool, vm_size: str, quota: int, used: int) -> dict[str, Any]:
    kind = "dedicated" if dedicated else "low-priority"
    return {
        "code": "AccountCoreQuotaReached" if dedicated else "AccountLowPriorityCoreQuotaReached",
        "message": (
            f"The specified account has reached its {kind} core quota: "
            f"{used} of {quota} {kind} cores are in use and a {vm_size} node needs "
            f"{cores_of(vm_size)}"
        ),
        "values": [
            {"name": "CoreQuota", "value": str(quota)},
            {"name": "CoresInUse", "value": str(used)},
            {"name": "VmSize", "value": vm_size},
        ],
    }


def _shortfall_error(code: str, dedicated: bool, reason: str) -> dict[str, Any]:
    kind = "dedicated" if dedicated else "low priority"
    return {
        "code": code,
        "message": f"Desired number of {kind} nodes could not be allocated as {reason}",
    }


_UNKNOWN = object()
_STATEMENT = re.compile(r"^\$(\w+)\s*=\s*(.+)$", re.DOTALL)


def evaluate_formula(formula: str) -> tuple[dict[str, Any], str | None]:
    """Evaluate the constant subset of an autoscale formula.

    Returns the variables assigned constants and, if the target variables could not be
    evaluated, why. Raises ``BatchError`` (400) for text that is not a list of assignments.
    """
    text = re.sub(r"//[^\n]*", "", formula)
    values: dict[str, Any] = {}
    for raw in re.split(r"[;\n]", text):
        statement = raw.strip()
        if not statement:
            continue
        match = _STATEMENT.match(statement)
        if match is None:
            raise BatchError(
                400,
                "AutoScalingFormulaSyntaxError",
                "An automatic scaling formula has a syntax error.",
                {"Statement": statement},
            )
        name, expression = match.group(1), match.group(2).strip()
        if name == "TargetDedicated":  # the formula language's older name
            name = "TargetDedicatedNodes"
        if re.fullmatch(r"-?\d+", expression):
            values[name] = int(expression)
        elif re.fullmatch(r"\$\w+", expression) and expression[1:] in values:
            values[name] = values[expression[1:]]
        elif re.fullmatch(r"[A-Za-z]+", expression):
            values[name] = expression.lower()  # e.g. $NodeDeallocationOption = taskcompletion
        else:
            values[name] = _UNKNOWN  # not a constant: the emulator cannot evaluate it
    targets = ("TargetDedicatedNodes", "TargetLowPriorityNodes")
    unknown = [t for t in targets if t in values and not isinstance(values[t], int)]
    if not any(t in values for t in targets):
        unknown = list(targets)
    reason = None
    if unknown:
        reason = "the emulator evaluates only integer constants assigned to " + ", ".join(
            f"${t}" for t in unknown
        )
    values = {k: v for k, v in values.items() if v is not _UNKNOWN}
    return values, reason


class Account:
    """The state of one Batch account, guarded by one lock, advanced by a ticker thread."""

    def __init__(
        self,
        *,
        name: str,
        root: Path,
        base_url: str,
        node_start_delay: float,
        quotas: dict[str, int | None] | None,
        env: dict[str, str],
        tick: float = 0.02,
    ) -> None:
        self.name = name
        self.root = root
        self.base_url = base_url
        self.delay = node_start_delay
        #: Seconds after which a preempted node is allocated again (Batch seeks its Spot
        #: target when capacity returns); None keeps preempted nodes preempted.
        self.restore_after: float | None = None
        self.quotas: dict[str, int | None] = {
            "dedicated_cores": None,
            "low_priority_cores": None,
            "pools": None,
        }
        self.quotas.update(quotas or {})
        self.env = env
        #: The account's addresses: each node's, and each pool's public one.
        self.network = LoopbackNetwork.random()
        self.forwarders: list[Forwarder] = []
        self.lock = threading.RLock()
        self.pools: dict[str, Pool] = {}
        self.stalls: dict[str, float] = {}  # pool id -> allocations stall until this time
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-emulator-ticker")
        self._thread.daemon = True

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the clock and kill every node's processes, waiting until they are gone."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self.lock:
            nodes = [n for p in self.pools.values() for n in p.nodes.values()]
        for node in nodes:
            if node.processes is not None:
                node.processes.kill()
        for node in nodes:
            if node.processes is not None:
                node.processes.kill_and_wait()
            node.close_endpoints()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            with self.lock:
                self.advance(time.time())

    # ------------------------------------------------------------------ lookups

    def pool(self, pool_id: str) -> Pool:
        """The pool with this id; Batch ids are case-preserving but case-insensitive."""
        pool = self.pools.get(pool_id) or next(
            (p for key, p in self.pools.items() if key.lower() == pool_id.lower()), None
        )
        if pool is None:
            raise BatchError(404, "PoolNotFound", "The specified pool does not exist.")
        return pool

    def node(self, pool_id: str, node_id: str) -> Node:
        node = self.pool(pool_id).nodes.get(node_id)
        if node is None:
            raise BatchError(
                404, "NodeNotFound", "The specified compute node does not exist in the pool."
            )
        return node

    def _active_pool(self, pool_id: str) -> Pool:
        pool = self.pool(pool_id)
        if pool.state == "deleting":
            raise BatchError(409, "PoolBeingDeleted", "The specified pool is being deleted.")
        return pool

    # ------------------------------------------------------------------ pool operations

    def create_pool(self, body: dict[str, Any]) -> Pool:
        now = time.time()
        pool_id = body.get("id")
        if not pool_id:
            raise missing("id")
        if not isinstance(pool_id, str) or not _POOL_ID.match(pool_id):
            raise invalid("id", pool_id, "up to 64 letters, digits, hyphens and underscores")
        if not body.get("vmSize"):
            raise missing("vmSize")
        vm_config = body.get("virtualMachineConfiguration")
        if not isinstance(vm_config, dict):
            raise missing("virtualMachineConfiguration")
        for name in ("imageReference", "nodeAgentSKUId"):
            if not vm_config.get(name):
                raise missing(f"virtualMachineConfiguration.{name}")
        start_task = body.get("startTask")
        if start_task is not None and not (start_task or {}).get("commandLine"):
            raise missing("startTask.commandLine")
        timeout = _duration(body, "resizeTimeout", DEFAULT_RESIZE_TIMEOUT)
        try:
            nats = nat_pools(body)
        except EndpointError as exc:
            raise invalid(exc.name, exc.value, exc.reason) from None
        autoscale = bool(body.get("enableAutoScale"))
        if autoscale:
            for name in ("targetDedicatedNodes", "targetLowPriorityNodes"):
                if body.get(name) is not None:
                    raise invalid(name, body[name], "must not be set when enableAutoScale")
            if not body.get("autoScaleFormula"):
                raise missing("autoScaleFormula")
            evaluate_formula(body["autoScaleFormula"])  # 400 on syntax errors
        dedicated = _count(body, "targetDedicatedNodes")
        low = _count(body, "targetLowPriorityNodes")
        interval = None
        if autoscale:
            interval = self._interval(body)
        with self.lock:
            if pool_id.lower() in (p.lower() for p in self.pools):
                raise BatchError(409, "PoolExists", "The specified pool already exists.")
            limit = self.quotas.get("pools")
            if limit is not None and len(self.pools) >= limit:
                raise BatchError(
                    409, "PoolQuotaReached", "The account has reached its quota of pools."
                )
            pool = Pool(body, now, nats, self.network.next_address(), self.forwarders)
            self.pools[pool_id] = pool
            if autoscale:
                pool.interval_iso = interval
                self._apply_formula(pool, now)
            elif dedicated or low:
                pool.start_resize(dedicated, low, timeout, now)
            else:
                pool.resize_timeout_iso, pool.resize_timeout = timeout
            return pool

    def list_pools(self) -> list[Pool]:
        with self.lock:
            return sorted(self.pools.values(), key=lambda p: p.id)

    def delete_pool(self, pool_id: str) -> None:
        now = time.time()
        with self.lock:
            pool = self._active_pool(pool_id)
            pool.state, pool.state_time = "deleting", now
            pool.stopping = False
            pool.set_allocation_state("resizing", now)
            for node in list(pool.nodes.values()):
                self._start_leaving(node, now)
            pool.touch(now)

    def resize_pool(self, pool_id: str, body: dict[str, Any]) -> None:
        now = time.time()
        dedicated = _count(body, "targetDedicatedNodes")
        low = _count(body, "targetLowPriorityNodes")
        timeout = _duration(body, "resizeTimeout", DEFAULT_RESIZE_TIMEOUT)
        with self.lock:
            pool = self._active_pool(pool_id)
            if pool.autoscale:
                raise BatchError(
                    409,
                    AUTOSCALE_RESIZE_CONFLICT,
                    "The pool has automatic scaling enabled; it cannot be resized by hand.",
                    {"Reason": "enableAutoScale is true"},
                )
            self._require_steady(pool)
            pool.deallocation_option = body.get("nodeDeallocationOption") or "requeue"
            pool.start_resize(dedicated, low, timeout, now)
            self._shrink(pool, now)

    def stop_resize(self, pool_id: str) -> None:
        now = time.time()
        with self.lock:
            pool = self._active_pool(pool_id)
            if pool.allocation_state == "resizing":
                pool.stopping = True
                pool.set_allocation_state("stopping", now)

    def remove_nodes(self, pool_id: str, body: dict[str, Any]) -> None:
        now = time.time()
        node_ids = body.get("nodeList")
        if not node_ids:
            raise missing("nodeList")
        if not isinstance(node_ids, list) or len(node_ids) > 100:
            raise invalid("nodeList", node_ids, "a list of 1 to 100 node ids")
        timeout = _duration(body, "resizeTimeout", DEFAULT_RESIZE_TIMEOUT)
        with self.lock:
            pool = self._active_pool(pool_id)
            self._require_steady(pool)
            nodes = [self.node(pool_id, node_id) for node_id in node_ids]
            pool.deallocation_option = body.get("nodeDeallocationOption") or "requeue"
            leaving = [n for n in nodes if n.state != "leavingpool"]
            dedicated = pool.target_dedicated - sum(n.dedicated for n in leaving)
            low = pool.target_low - sum(not n.dedicated for n in leaving)
            pool.start_resize(max(0, dedicated), max(0, low), timeout, now)
            for node in leaving:
                self._start_leaving(node, now)

    def enable_autoscale(self, pool_id: str, body: dict[str, Any]) -> None:
        now = time.time()
        with self.lock:
            pool = self._active_pool(pool_id)
            if pool.allocation_state != "steady":
                raise BatchError(
                    409,
                    "PoolBeingResized",
                    "Automatic scaling cannot be enabled while the pool is resizing.",
                )
            formula = body.get("autoScaleFormula") or (pool.formula if pool.autoscale else None)
            if not formula:
                raise missing("autoScaleFormula")
            evaluate_formula(formula)
            if body.get("autoScaleEvaluationInterval") is not None or not pool.autoscale:
                pool.interval_iso = self._interval(body)
            pool.autoscale, pool.formula = True, formula
            pool.touch(now)
            self._apply_formula(pool, now)

    def disable_autoscale(self, pool_id: str) -> None:
        now = time.time()
        with self.lock:
            pool = self._active_pool(pool_id)
            pool.autoscale = False
            pool.formula = pool.interval_iso = pool.autoscale_run = None
            pool.touch(now)

    def evaluate_autoscale(self, pool_id: str, body: dict[str, Any]) -> dict[str, Any]:
        formula = body.get("autoScaleFormula")
        if not formula:
            raise missing("autoScaleFormula")
        with self.lock:
            pool = self.pool(pool_id)
            if not pool.autoscale:
                raise BatchError(
                    409,
                    "OperationInvalidForCurrentState",
                    "Automatic scaling must be enabled on the pool to evaluate a formula.",
                )
            return self._autoscale_run(evaluate_formula(formula), time.time())

    def update_pool(self, pool_id: str, body: dict[str, Any], replace: bool) -> None:
        """PATCH (only the properties sent change) or updateproperties (all are replaced)."""
        now = time.time()
        with self.lock:
            pool = self._active_pool(pool_id)
            if replace and body.get("metadata") is None:
                raise missing("metadata")
            if replace or "startTask" in body:
                start_task = body.get("startTask")
                if start_task is not None and not start_task.get("commandLine"):
                    raise missing("startTask.commandLine")
                pool.spec = {**pool.spec, "startTask": start_task}
            if body.get("metadata") is not None:
                pool.metadata = list(body["metadata"])
            pool.touch(now)

    def _interval(self, body: dict[str, Any]) -> str:
        raw, seconds = _duration(body, "autoScaleEvaluationInterval", DEFAULT_AUTOSCALE_INTERVAL)
        if not 300 <= seconds <= 168 * 3600:
            raise invalid("autoScaleEvaluationInterval", raw, "between 5 minutes and 168 hours")
        return raw

    def _autoscale_run(
        self, evaluated: tuple[dict[str, Any], str | None], now: float
    ) -> dict[str, Any]:
        values, reason = evaluated
        if reason is not None:
            return {
                "timestamp": rfc3339(now),
                "error": {"code": "UnsupportedByEmulator", "message": reason},
            }
        shown = {
            "TargetDedicatedNodes": values.get("TargetDedicatedNodes", 0),
            "TargetLowPriorityNodes": values.get("TargetLowPriorityNodes", 0),
            "NodeDeallocationOption": values.get("NodeDeallocationOption", "requeue"),
        }
        results = ";".join(f"${k}={v}" for k, v in {**shown, **values}.items())
        return {"timestamp": rfc3339(now), "results": results}

    def _apply_formula(self, pool: Pool, now: float) -> None:
        assert pool.formula is not None
        values, reason = evaluate_formula(pool.formula)
        pool.autoscale_run = self._autoscale_run((values, reason), now)
        if reason is not None:
            return
        pool.deallocation_option = values.get("NodeDeallocationOption", "requeue")
        pool.start_resize(
            max(0, values.get("TargetDedicatedNodes", 0)),
            max(0, values.get("TargetLowPriorityNodes", 0)),
            (DEFAULT_RESIZE_TIMEOUT, 900.0),
            now,
        )
        self._shrink(pool, now)

    @staticmethod
    def _require_steady(pool: Pool) -> None:
        if pool.allocation_state != "steady":
            raise BatchError(
                409,
                "PoolBeingResized",
                "The operation is not permitted while the pool is resizing.",
                {"AllocationState": pool.allocation_state},
            )

    # ------------------------------------------------------------------ the clock

    def advance(self, now: float) -> None:
        """Move every pool and node on to where it should be at time ``now``."""
        for pool in list(self.pools.values()):
            for node in list(pool.nodes.values()):
                self._advance_node(node, now)
            if pool.state == "deleting":
                if not pool.nodes and now >= pool.state_time + self.delay:
                    del self.pools[pool.id]
                continue
            if pool.allocation_state != "steady":
                self._advance_resize(pool, now)

    def _advance_node(self, node: Node, now: float) -> None:
        if node.fake and node.state != "leavingpool":
            return  # a record: it stays as the test put it until it is removed
        if node.state == "creating" and now >= node.next_at:
            node.set_state("starting", now)
            node.boot_time = now
            node.next_at = now + self.delay
        elif node.state == "starting" and now >= node.next_at:
            self._boot(node, now)
        elif (
            node.state == "preempted"
            and self.restore_after is not None
            and now >= node.next_at
            and (node.processes is None or node.processes.gone())
        ):
            node.set_state("starting", now)  # capacity is back: the same node boots again
            node.next_at = now + self.delay
        elif (
            node.state == "leavingpool"
            and now >= node.next_at
            and (node.processes is None or node.processes.gone())
        ):
            node.close_endpoints()
            del node.pool.nodes[node.id]
            node.pool.touch(now)

    def _advance_resize(self, pool: Pool, now: float) -> None:
        stalled = now < self.stalls.get(pool.id, 0.0)
        timed_out = now >= pool.resize_started + pool.resize_timeout
        for dedicated in (True, False):
            target = pool.target_dedicated if dedicated else pool.target_low
            short = target - len(pool.counted(dedicated))
            if short <= 0 or pool.blocked[dedicated] or pool.stopping:
                continue
            if stalled:
                if timed_out:
                    pool.blocked[dedicated] = True
                    pool.resize_errors.append(
                        _shortfall_error(
                            "AllocationTimedout", dedicated, "the resize timeout was reached"
                        )
                    )
                continue
            self._allocate(pool, dedicated, short, now)
        busy = any(n.state in ("creating", "leavingpool") for n in pool.nodes.values())
        if busy:
            return
        if pool.stopping:
            for dedicated in (True, False):
                target = pool.target_dedicated if dedicated else pool.target_low
                if len(pool.counted(dedicated)) != target:
                    pool.resize_errors.append(
                        _shortfall_error("ResizeStopped", dedicated, "the resize was stopped")
                    )
            pool.stopping = False
            pool.set_allocation_state("steady", now)
            return
        done = all(
            pool.blocked[d]
            or len(pool.counted(d)) >= (pool.target_dedicated if d else pool.target_low)
            for d in (True, False)
        )
        if done:
            pool.set_allocation_state("steady", now)

    def _allocate(self, pool: Pool, dedicated: bool, wanted: int, now: float) -> None:
        key = "dedicated_cores" if dedicated else "low_priority_cores"
        quota = self.quotas.get(key)
        per_node = cores_of(pool.vm_size)
        count = wanted
        if quota is not None:
            used = self._cores_in_use(dedicated)
            count = min(wanted, max(0, (quota - used) // per_node))
            if count < wanted:
                pool.blocked[dedicated] = True
                pool.resize_errors.append(_quota_error(dedicated, pool.vm_size, quota, used))
        for _ in range(count):
            node = Node(pool, dedicated, now, self.delay, self.network.next_address())
            pool.nodes[node.id] = node
        if count:
            pool.touch(now)

    def _cores_in_use(self, dedicated: bool) -> int:
        return sum(
            cores_of(p.vm_size)
            for p in self.pools.values()
            for n in p.nodes.values()
            if n.dedicated is dedicated and n.state != "preempted"
        )

    def _shrink(self, pool: Pool, now: float) -> None:
        """Pick the nodes a smaller target leaves out and start removing them."""
        for dedicated in (True, False):
            target = pool.target_dedicated if dedicated else pool.target_low
            nodes = pool.counted(dedicated)
            excess = len(nodes) - target
            if excess <= 0:
                continue
            nodes.sort(key=lambda n: (_REMOVAL_ORDER.get(n.state, 0), -n.allocation_time))
            for node in nodes[:excess]:
                self._start_leaving(node, now)

    def _start_leaving(self, node: Node, now: float) -> None:
        if node.state == "leavingpool":
            return
        node.set_state("leavingpool", now)
        node.next_at = now + self.delay
        if node.processes is not None:
            node.processes.kill()
        node.pool.touch(now)

    # ------------------------------------------------------------------ start tasks

    def _boot(self, node: Node, now: float) -> None:
        pool = node.pool
        start_task = pool.spec.get("startTask")
        node.processes = NodeProcesses(self.root / pool.id / node.id)
        if not node.forwarders:
            node.open_endpoints()
        if not start_task:
            node.set_state("idle", now)
            return
        waits = start_task.get("waitForSuccess", True)
        node.set_state("waitingforstarttask" if waits else "idle", now)
        spec = StartTaskSpec(
            command_line=start_task["commandLine"],
            environment={
                e["name"]: e.get("value") or "" for e in start_task.get("environmentSettings") or []
            },
            max_retries=int(start_task.get("maxTaskRetryCount") or 0),
            resource_files=tuple(
                (f["httpUrl"], f.get("filePath") or f["httpUrl"].rsplit("/", 1)[-1].split("?")[0])
                for f in start_task.get("resourceFiles") or []
                if f.get("httpUrl")
            ),
        )
        node.processes.start(
            spec,
            self._node_env(node),
            on_start=lambda number, started: self._on_start(node, number, started),
            on_exit=lambda attempt: self._on_exit(node, waits, attempt),
        )

    def _node_env(self, node: Node) -> dict[str, str]:
        """The node's environment: the emulator's own plus the variables Batch sets."""
        assert node.processes is not None
        dirs = node.processes.dirs
        pool = node.pool
        env = dict(self.env)
        env.update(
            {
                "AZ_BATCH_ACCOUNT_NAME": self.name,
                "AZ_BATCH_ACCOUNT_URL": self.base_url,
                "AZ_BATCH_POOL_ID": pool.id,
                "AZ_BATCH_NODE_ID": node.id,
                "AZ_BATCH_NODE_IS_DEDICATED": "true" if node.dedicated else "false",
                "AZ_BATCH_NODE_ROOT_DIR": str(dirs["root"]),
                "AZ_BATCH_NODE_SHARED_DIR": str(dirs["shared"]),
                "AZ_BATCH_NODE_STARTUP_DIR": str(dirs["startup"]),
                "AZ_BATCH_NODE_STARTUP_WORKING_DIR": str(dirs["startup_wd"]),
                "AZ_BATCH_NODE_MOUNTS_DIR": str(dirs["mounts"]),
                "AZ_BATCH_TASK_DIR": str(dirs["startup"]),
                "AZ_BATCH_TASK_WORKING_DIR": str(dirs["startup_wd"]),
            }
        )
        # Where the node's processes listen: its own address only (a VM has no other).
        env[NODE_HOST_VARIABLE] = node.address
        if pool.spec.get("enableInterNodeCommunication"):
            # One entry per node of the pool that is allocated (not leaving or preempted)
            # when the start task starts.
            hosts = [
                n.address
                for n in pool.nodes.values()
                if n.state not in ("leavingpool", "preempted")
            ]
            env["AZ_BATCH_HOST_LIST"] = ",".join(hosts)
            env["AZ_BATCH_NODE_LIST"] = ";".join(hosts)
        return env

    def _alive(self, node: Node) -> bool:
        return (
            node.pool.nodes.get(node.id) is node
            and node.state not in ("leavingpool", "preempted")
            and self.pools.get(node.pool.id) is node.pool
        )

    def _on_start(self, node: Node, number: int, started: float) -> None:
        with self.lock:
            if not self._alive(node):
                return
            info: dict[str, Any] = {
                "state": "running",
                "startTime": rfc3339(started),
                "retryCount": number,
            }
            if number:
                info["lastRetryTime"] = rfc3339(started)
            node.start_task_info = info

    def _on_exit(self, node: Node, waits: bool, attempt: Attempt) -> None:
        with self.lock:
            if not self._alive(node) or node.start_task_info is None:
                return
            if attempt.will_retry:
                return  # the next attempt's on_start records it
            info = node.start_task_info
            info["state"] = "completed"
            info["endTime"] = rfc3339(attempt.ended)
            info["exitCode"] = attempt.exit_code
            ok = attempt.exit_code == 0
            info["result"] = "success" if ok else "failure"
            if not ok:
                if attempt.error is not None:
                    code, message = "CommandLaunchFailed", attempt.error
                else:
                    code = "FailureExitCode"
                    message = "The task process exited with an unexpected exit code"
                info["failureInfo"] = {
                    "category": "usererror",
                    "code": code,
                    "message": message,
                    "details": [{"name": "Message", "value": message}],
                }
            if waits:
                node.set_state("idle" if ok else "starttaskfailed", time.time())

    # ------------------------------------------------------------------ admin helpers

    def add_fake_nodes(self, pool_id: str, count: int, state: str, dedicated: bool) -> list[str]:
        with self.lock:
            pool = self._active_pool(pool_id)
            if state not in FAKE_NODE_STATES:
                raise ValueError(
                    f"state={state!r}: a fake node can be {', '.join(sorted(FAKE_NODE_STATES))}"
                )
            if count < 0:
                raise ValueError(f"count={count}: pass a number of nodes, 0 or more")
            now = time.time()
            made = []
            for _ in range(count):
                node = Node(pool, dedicated, now, self.delay, self.network.next_address())
                node.fake = True
                node.set_state(state, now)
                node.boot_time = now
                if state not in ("creating", "starting"):
                    node.start_task_info = {
                        "state": "completed",
                        "startTime": rfc3339(now),
                        "endTime": rfc3339(now),
                        "exitCode": 0 if state != "starttaskfailed" else 1,
                        "result": "success" if state != "starttaskfailed" else "failure",
                        "retryCount": 0,
                    }
                pool.nodes[node.id] = node
                made.append(node.id)
            if dedicated:
                pool.target_dedicated += count
            else:
                pool.target_low += count
            pool.touch(now)
            return made

    def preempt(self, pool_id: str, node_id: str) -> None:
        with self.lock:
            node = self.node(pool_id, node_id)
            if node.dedicated:
                raise ValueError(f"{node_id} is a dedicated node; only low-priority ones are")
            if node.state == "leavingpool":
                raise ValueError(f"{node_id} is leaving the pool")
            now = time.time()
            node.set_state("preempted", now)
            node.pool.touch(now)
            if self.restore_after is not None:
                node.next_at = now + self.restore_after
            processes = node.processes
        if processes is not None:
            processes.kill_and_wait()

    def break_node(self, pool_id: str, node_id: str) -> None:
        """The node's VM fails: Batch shows it ``unusable``; its processes are gone."""
        with self.lock:
            node = self.node(pool_id, node_id)
            now = time.time()
            node.set_state("unusable", now)
            node.pool.touch(now)
            processes = node.processes
        if processes is not None:
            processes.kill_and_wait()

    def set_quota(self, **quotas: int | None) -> None:
        unknown = set(quotas) - set(self.quotas)
        if unknown:
            raise TypeError(f"unknown quotas: {sorted(unknown)}")
        with self.lock:
            self.quotas.update(quotas)

    def fail_allocations(self, pool_id: str, seconds: float = math.inf) -> None:
        with self.lock:
            self.stalls[pool_id] = time.time() + seconds

    def cut_frontend(self, pool_id: str, seconds: float) -> None:
        with self.lock:
            forwarders = [f for n in self.pool(pool_id).nodes.values() for f in n.forwarders]
        for forwarder in forwarders:
            forwarder.cut(seconds)

    def connections(self, pool_id: str) -> list[Connection]:
        with self.lock:
            return self.pool(pool_id).connections()

    def all_connections(self) -> list[Connection]:
        with self.lock:
            return sorted((c for f in self.forwarders for c in f.log), key=lambda c: c.time)

    def node_processes(self, pool_id: str) -> dict[str, list[int]]:
        with self.lock:
            nodes = list(self.pool(pool_id).nodes.values())
        return {n.id: n.processes.pids() if n.processes else [] for n in nodes}
