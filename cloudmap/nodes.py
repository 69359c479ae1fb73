"""Node states, and the pool's view of a node: the provider's word merged with the scheduler's.

Kept free of heavy imports: the node agent imports it to name its slots.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


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
