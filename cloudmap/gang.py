"""Whole nodes, held exclusively: how MPI runs share a pool with maps without deadlock.

An MPI run needs k whole nodes at once. Requests wait in one FIFO queue, and only the
request at its head reserves nodes: it drains them (no new map task; tasks queued there
move elsewhere) and takes them once the tasks they were running have finished. As only one
request ever holds a partial set, two runs can never each hold half of what the other
needs; maps keep every node that is not reserved or leased, and get nodes back as soon as
a run ends. A request the pool can never satisfy fails at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .cluster import DaskCluster
from .errors import InputError
from .loops import poll_until
from .nodes import NodeInfo, NodeState, NodeView

#: Seconds between looks at the nodes while a request waits.
POLL = 0.05


@dataclass(eq=False)
class Lease:
    """Nodes held by one MPI run; give them back with ``GangScheduler.release``."""

    count: int
    nodes: list[NodeInfo] = field(default_factory=list)
    reserved: list[str] = field(default_factory=list)


class GangScheduler:
    """Hands out whole nodes to MPI runs (see the module docstring).

    ``nodes`` is the pool's view of its nodes, where the gang marks the nodes it holds;
    ``capacity`` is the most usable nodes the pool can ever have (its size, or autoscale's
    maximum); ``nudge`` asks the pool to re-evaluate its size (autoscale) because a
    request waits.
    """

    def __init__(
        self,
        cluster: DaskCluster,
        *,
        nodes: NodeView,
        capacity: Callable[[], int],
        nudge: Callable[[], None],
    ) -> None:
        self._cluster = cluster
        self._nodes = nodes
        self._capacity = capacity
        self._nudge = nudge
        self._lock = threading.Lock()
        self._queue: deque[Lease] = deque()
        self._held: dict[str, Lease] = {}  # node id -> the lease reserving or holding it

    def waiting_nodes(self) -> int:
        """Nodes the queued requests still lack (autoscale counts them as demand)."""
        with self._lock:
            return sum(lease.count - len(lease.reserved) for lease in self._queue)

    def acquire(self, count: int) -> Lease:
        """Block until ``count`` whole nodes are this caller's; return them."""
        self._check_capacity(count)
        lease = Lease(count)
        with self._lock:
            self._queue.append(lease)

        def complete() -> bool:
            if self._try_to_complete(lease):
                return True
            self._nudge()
            self._check_capacity(count)  # the pool may have shrunk meanwhile
            return False

        try:
            poll_until(complete, None, interval=POLL)
            return lease
        except BaseException:
            self.release(lease)
            raise

    def release(self, lease: Lease) -> None:
        """Give the lease's nodes back to the pool (maps may use them at once)."""
        with self._lock:
            if lease in self._queue:
                self._queue.remove(lease)
            freed = [node for node, owner in self._held.items() if owner is lease]
            for node in freed:
                del self._held[node]
            self._nodes.set_held(self._held)
        for node in freed:
            # Exception: the node or the pool is gone, and there is nothing to give back.
            with contextlib.suppress(Exception):
                self._cluster.undrain(node)

    def lost(self, node_ids: list[str]) -> list[str]:
        """Which of these leased nodes no longer serve (preempted, removed, dead)."""
        nodes = {n.id: n for n in self._nodes.nodes()}
        return [i for i in node_ids if i not in nodes or not _serving(nodes[i])]

    def _check_capacity(self, count: int) -> None:
        capacity = self._capacity()
        if count > capacity:
            raise InputError(
                f"this MPI run needs {count} whole nodes but the pool can hold at most "
                f"{capacity}; use nodes={capacity} or fewer, or grow the pool "
                "(pool.resize(...) or a larger Autoscale(max_nodes=...))"
            )

    def _try_to_complete(self, lease: Lease) -> bool:
        nodes = {n.id: n for n in self._nodes.nodes()}
        with self._lock:
            if not self._queue or self._queue[0] is not lease:
                return False  # only the head of the queue reserves nodes
            for node_id in list(lease.reserved):  # a reserved node may have been lost
                if node_id not in nodes or not _serving(nodes[node_id]):
                    lease.reserved.remove(node_id)
                    del self._held[node_id]
            wanted = lease.count - len(lease.reserved)
            free = [n for n in nodes.values() if _serving(n) and n.id not in self._held]
            free.sort(key=lambda n: (n.busy_slots, n.id))  # idle nodes first
            newly = [n.id for n in free[:wanted]]
            for node_id in newly:
                lease.reserved.append(node_id)
                self._held[node_id] = lease
            self._nodes.set_held(self._held)
        for node_id in newly:
            self._cluster.drain(node_id)
        if len(lease.reserved) < lease.count:
            return False
        if not self._cluster.nodes_quiet(lease.reserved):
            return False  # map tasks they were running have not finished yet
        with self._lock:
            self._queue.remove(lease)
        lease.nodes = [nodes[i] for i in lease.reserved]
        return True


def _serving(node: NodeInfo) -> bool:
    return node.state in (NodeState.IDLE, NodeState.RUNNING) and len(node.workers) >= node.slots
