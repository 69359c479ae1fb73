"""Node states, and the pool's view of its nodes: the provider's word merged with the scheduler's.

Kept free of heavy imports: the node agent imports it to name its slots.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from .errors import NoNodesError
from .loops import poll_until


class NodeState(str, enum.Enum):
    """The life of a node, named as in Azure Batch."""

    CREATING = "creating"  # the provider is making the node
    STARTING = "starting"  # the start task runs, or the slots are joining the scheduler
    IDLE = "idle"  # every slot is free
    RUNNING = "running"  # at least one slot runs a task
    PREEMPTED = "preempted"  # a spot node taken back by the provider
    LEAVING = "leaving"  # being removed from the pool
    START_FAILED = "start_failed"  # the start task failed; see NodeInfo.start_task
    UNUSABLE = "unusable"  # the node died or its slots cannot run

    def __str__(self) -> str:
        return self.value


#: States a node does not leave by itself; it must be removed.
FINAL_STATES = frozenset({NodeState.START_FAILED, NodeState.UNUSABLE, NodeState.PREEMPTED})


@dataclass(frozen=True)
class StartTaskInfo:
    """The outcome of a node's start task; ``exit_code`` is None while it runs."""

    exit_code: int | None
    stdout: str
    stderr: str


@dataclass(frozen=True)
class ProviderNode:
    """A node as its provider sees it, before any worker has joined.

    ``state`` is one of creating, starting, ready (slots launched), start_failed, leaving,
    preempted or unusable: the provider cannot know whether slots are idle or running.
    ``restoring`` marks a preempted node that the provider will bring back, as Batch does.
    ``reason`` says why a node is unusable, when its agent could tell.
    """

    id: str
    state: str
    dedicated: bool
    slots: int
    since: datetime
    start_task: StartTaskInfo | None = None
    restoring: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class NodeInfo:
    """One node of the pool as the user sees it (``pool.nodes()``).

    ``dedicated`` is False for a spot node. ``since`` is when the node entered ``state``.
    """

    id: str
    state: NodeState
    dedicated: bool
    slots: int
    since: datetime
    busy_slots: int = 0
    workers: tuple[str, ...] = field(default=())
    start_task: StartTaskInfo | None = None
    restoring: bool = False

    @property
    def spot(self) -> bool:
        return not self.dedicated


def slot_name(node_id: str, slot: int) -> str:
    """The Dask worker name of a node's slot: ``node-3/slot-0``."""
    return f"{node_id}/slot-{slot}"


def node_of(worker_name: object) -> str | None:
    """The node id inside a slot's worker name, or None for a worker cloudmap did not start."""
    name = str(worker_name)
    node, sep, _ = name.rpartition("/slot-")
    return node if sep else None


def merged_state(provider_state: str, joined_slots: int, busy_slots: int) -> NodeState:
    """Combine the provider's state with what the scheduler knows of the node's slots."""
    if provider_state == "ready":
        if joined_slots == 0:
            return NodeState.STARTING
        return NodeState.RUNNING if busy_slots else NodeState.IDLE
    return NodeState(provider_state)


#: Seconds a node that has served may be without any slot (its agent restarts slots that
#: die within a few seconds) before it counts as unusable. Local nodes whose agent exits
#: are unusable at once; a Batch node stays "idle" to Batch whatever became of cloudmap on
#: it, so this is how the pool learns that such a VM no longer serves.
SLOTS_LOST_GRACE = 20.0
_READY = (NodeState.IDLE, NodeState.RUNNING)


class NodeLister(Protocol):
    """Where nodes come from: the pool's provider."""

    def list_nodes(self) -> list[ProviderNode]: ...


class SlotDirectory(Protocol):
    """Which slots have joined the scheduler, by node: the cluster glue."""

    def slots_by_node(self) -> dict[str, list[tuple[str, int]]]: ...

    def slot_count(self, max_age: float = 0.5) -> int: ...


class FileReader(Protocol):
    """Reads files from nodes: the pool's provider."""

    def read_file(self, node_id: str, path: str) -> bytes: ...


class NodeFiles:
    """Files of one node, read through its provider (``pool.node(node_id)``)."""

    def __init__(self, provider: FileReader, node_id: str) -> None:
        self._provider = provider
        self.id = node_id

    def read_file(self, path: str, *, binary: bool = False) -> Any:
        """A file under the node's root directory, e.g. ``"startup/stdout.txt"`` or a task's
        ``"tasks/run-.../item-0-.../stderr.txt"`` (text unless ``binary=True``)."""
        data = self._provider.read_file(self.id, path)
        return data if binary else data.decode(errors="replace")

    def __repr__(self) -> str:
        return f"<cloudmap node {self.id}>"


class NodeView:
    """The pool's nodes as the user sees them: the provider's word merged with the scheduler's.

    It remembers what one listing cannot tell: since when a node has been in its state (a
    provider says "ready" whether slots are idle or running), which nodes have served, and
    since when a node that served has had no slot. The scaler and the gang scheduler push
    their marks here (nodes leaving, nodes held whole by MPI runs) rather than being asked,
    so that listing nodes never calls back into them. Safe to use from any thread.
    """

    def __init__(self, provider: NodeLister, slots: SlotDirectory) -> None:
        self._provider = provider
        self._slots = slots
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[NodeState, datetime]] = {}
        self._served: set[str] = set()  # nodes whose slots have joined at some time
        self._slots_lost: dict[str, datetime] = {}  # served nodes without a slot, since
        self._leaving: frozenset[str] = frozenset()
        self._held: frozenset[str] = frozenset()

    def set_leaving(self, node_ids: Iterable[str]) -> None:
        """The nodes the scaler is removing once their running tasks finish."""
        with self._lock:
            self._leaving = frozenset(node_ids)

    def set_held(self, node_ids: Iterable[str]) -> None:
        """The nodes MPI runs reserve or hold whole: busy, as far as the pool can tell."""
        with self._lock:
            self._held = frozenset(node_ids)

    def nodes(self) -> list[NodeInfo]:
        """Every node with its state (``pool.nodes()``)."""
        provider_nodes = self._provider.list_nodes()
        slots = self._slots.slots_by_node()
        now = datetime.now(timezone.utc)
        infos = []
        with self._lock:
            for node in provider_nodes:
                joined = slots.get(node.id, [])
                busy = sum(1 for _, processing in joined if processing)
                state = merged_state(node.state, len(joined), busy)
                if node.id in self._leaving:
                    state = NodeState.LEAVING
                elif node.id in self._held and state in _READY:
                    state, busy = NodeState.RUNNING, node.slots  # an MPI run holds it whole
                state = self._unless_slots_lost(node.id, state, now)
                since = node.since
                if node.state == "ready" or node.id in self._leaving:  # the pool's own time
                    previous = self._seen.get(node.id)
                    since = previous[1] if previous and previous[0] == state else now
                self._seen[node.id] = (state, since)
                infos.append(
                    NodeInfo(
                        id=node.id,
                        state=state,
                        dedicated=node.dedicated,
                        slots=node.slots,
                        since=since,
                        busy_slots=busy,
                        workers=tuple(address for address, _ in joined),
                        start_task=node.start_task,
                        restoring=node.restoring,
                    )
                )
        return infos

    def _unless_slots_lost(self, node_id: str, state: NodeState, now: datetime) -> NodeState:
        """``unusable`` for a node that has served and has had no slot for
        SLOTS_LOST_GRACE (the provider may still call it ready); else ``state``."""
        if state != NodeState.STARTING or node_id not in self._served:
            if state in _READY:
                self._served.add(node_id)
                self._slots_lost.pop(node_id, None)
            return state
        lost = self._slots_lost.setdefault(node_id, now)
        if (now - lost).total_seconds() > SLOTS_LOST_GRACE:
            return NodeState.UNUSABLE
        return state

    def wait_for(
        self, count: int | None, targets: Callable[[], tuple[int, int]], timeout: float
    ) -> None:
        """Block until ``count`` nodes have every slot connected; None: the ``targets``,
        less the nodes that will not serve (failed, or preempted for good)."""
        nodes: list[NodeInfo] = []
        wanted = 0

        def ready() -> bool:
            nonlocal nodes, wanted
            nodes = self.nodes()
            lost = sum(1 for n in nodes if n.state in FINAL_STATES and not n.restoring)
            wanted = max(0, sum(targets()) - lost) if count is None else count
            return len(_ready(nodes)) >= wanted

        def too_late(_: bool) -> TimeoutError:
            return TimeoutError(
                f"{len(_ready(nodes))} of {wanted} nodes ready after {timeout:g} s: "
                + ", ".join(f"{n.id}={n.state}" for n in nodes)
            )

        poll_until(ready, timeout, interval=0.05, on_timeout=too_late)
        # Plan the next map for every slot now connected, not for a count cached while
        # they were joining (DaskCluster.slot_count keeps a count for half a second).
        self._slots.slot_count(max_age=0)

    def capacity(self, max_nodes: int | None) -> int:
        """The most usable nodes the pool can have: autoscale's ``max_nodes`` when it
        autoscales, else the nodes it has that serve or will (failed and for-good
        preempted nodes do not)."""
        if max_nodes is not None:
            return max_nodes
        return sum(1 for n in self.nodes() if n.state not in FINAL_STATES or n.restoring)

    def slots_to_plan(self, max_nodes: int | None) -> int | None:
        """Slots to plan batches for: the connected ones, or those on the way while nodes
        start. None when there are none but autoscale (at most ``max_nodes``) will bring
        nodes for the work; :class:`~cloudmap.NoNodesError` when nothing will come."""
        connected = self._slots.slot_count()
        if connected:
            return connected
        nodes = self.nodes()  # as the pool sees them: a node that lost its slots is unusable
        coming = sum(n.slots for n in nodes if n.state not in FINAL_STATES or n.restoring)
        if coming:
            return coming
        failed = sum(1 for n in nodes if n.state in FINAL_STATES and not n.restoring)
        if max_nodes is not None and failed < max_nodes:
            return None
        raise NoNodesError(
            "the pool has no usable nodes; see pool.nodes() for why, and create a new pool"
        )


def _ready(nodes: list[NodeInfo]) -> list[NodeInfo]:
    return [n for n in nodes if n.state in _READY and len(n.workers) >= n.slots]
