"""The pool's size over time: target node counts, resizes, autoscale, and their history.

A :class:`Scaler` holds the pool's target dedicated and spot node counts, as a Batch pool
holds ``targetDedicatedNodes`` and ``targetLowPriorityNodes``, and makes the provider's nodes
match them: it adds nodes, and removes them either at once (``requeue``: running tasks go
back to the queue) or once their running tasks finish (``taskcompletion``: the node takes
no new task meanwhile). A background loop samples the pool every interval into a bounded
history, finishes those departures, and applies the autoscale policy when there is one.
The policy itself (:mod:`cloudmap.autoscale`) is a pure function; this module only feeds
it numbers and carries out its decisions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from .autoscale import Autoscale, KindCounts, ScalingInputs, decide
from .cluster import DaskCluster
from .errors import InputError, PoolClosedError
from .loops import Periodic
from .nodes import NodeInfo, NodeState, NodeView
from .providers import Provider
from .samples import ScalingSample

logger = logging.getLogger(__name__)

DEALLOCATION_CHOICES = ("requeue", "taskcompletion")
#: Samples kept by ``pool.scaling_history()``: one hour at one sample per second.
HISTORY_LENGTH = 3600
#: Seconds between samples without autoscale (with it: the policy's ``interval``).
SAMPLE_INTERVAL = 1.0
#: Seconds between asking the provider why the pool is short of its targets, while it is.
ALLOCATION_CHECK = 5.0
#: Seconds between checks while nodes are waiting for their tasks to finish before leaving.
DEPARTURE_CHECK = 0.2

_USABLE = frozenset({NodeState.CREATING, NodeState.STARTING, NodeState.IDLE, NodeState.RUNNING})
_FAILED = frozenset({NodeState.START_FAILED, NodeState.UNUSABLE})
#: Which nodes a resize gives up first: those that serve nothing, then those that have not
#: started serving, then the idle (longest idle first), and running ones last.
_RESIZE_ORDER = {
    NodeState.PREEMPTED: 0,
    NodeState.START_FAILED: 1,
    NodeState.UNUSABLE: 1,
    NodeState.CREATING: 2,
    NodeState.STARTING: 3,
    NodeState.IDLE: 4,
    NodeState.LEAVING: 5,
    NodeState.RUNNING: 6,
}
#: Autoscale removes the idle nodes its policy counted (preempted nodes are part of its
#: targets, to be restored or replaced; failed ones are kept for inspection).
_AUTOSCALE_ORDER = {
    **_RESIZE_ORDER,
    NodeState.IDLE: 0,
    NodeState.CREATING: 1,
    NodeState.STARTING: 2,
    NodeState.PREEMPTED: 3,
    NodeState.START_FAILED: 4,
    NodeState.UNUSABLE: 4,
}
#: Nodes that run nothing: removed at once even with ``taskcompletion``.
_NOT_SERVING = frozenset(
    {
        NodeState.CREATING,
        NodeState.STARTING,
        NodeState.PREEMPTED,
        NodeState.START_FAILED,
        NodeState.UNUSABLE,
    }
)


class Scaler:
    """Targets, resizes, departures, autoscale and history of one pool.

    ``nodes`` is the pool's view of its nodes, where the scaler marks the nodes it is
    removing; ``backlog`` is the work the pool's maps have not sent yet, in tasks. A
    :class:`~cloudmap.PoolClosedError` from either ends the loop.
    """

    def __init__(
        self,
        provider: Provider,
        cluster: DaskCluster,
        *,
        nodes: NodeView,
        backlog: Callable[[], int],
        slots_per_node: int,
        targets: tuple[int, int],
        policy: Autoscale | None,
    ) -> None:
        self._provider = provider
        self._cluster = cluster
        self._nodes = nodes
        self._backlog = backlog
        self._slots_per_node = slots_per_node
        self.targets = targets
        self.policy = policy
        self._leaving: set[str] = set()
        self._last_scale_up: float | None = None
        self._reason = ""
        self._history: deque[ScalingSample] = deque(maxlen=HISTORY_LENGTH)
        self._allocation_errors: list[str] = []
        self._allocation_checked = -ALLOCATION_CHECK
        self._lock = threading.Lock()
        self._loop = Periodic(
            self.tick,
            self._interval,
            "cloudmap-scaler",
            keep_going=True,
            stop_on=(PoolClosedError,),
        )

    # -- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Take the first sample now, so the history starts where the pool starts (before
        any work reaches it), then keep sampling on the loop's thread."""
        if self._loop.run_once():
            self._loop.start()

    def stop(self) -> None:
        """End the loop and wait for it, so that it never acts on a closing pool."""
        self._loop.stop(timeout=30)

    # -- what the pool asks --------------------------------------------------------------

    @property
    def max_nodes(self) -> int | None:
        """Autoscale's most nodes, or None when the pool keeps its targets."""
        policy = self.policy
        return None if policy is None else policy.max_nodes

    def allocation_errors(self) -> list[str]:
        """Why the provider could not bring the pool to its targets, as last looked at
        (empty while the targets are met or nothing is known to stand in the way)."""
        with self._lock:
            return list(self._allocation_errors)

    def history(self) -> list[ScalingSample]:
        """One sample per evaluation: every interval, and at once after a resize, a policy
        change or work reaching an empty pool; the last HISTORY_LENGTH are kept."""
        with self._lock:
            return list(self._history)

    def resize(self, dedicated: int, spot: int, deallocation: str) -> None:
        """Set the targets and start making the nodes match them; returns without waiting."""
        if deallocation not in DEALLOCATION_CHOICES:
            choices = " or ".join(map(repr, DEALLOCATION_CHOICES))
            raise InputError(f"deallocation={deallocation!r} is not valid: pass {choices}")
        with self._lock:
            if self.policy is not None:
                raise InputError(
                    "this pool autoscales, so its size is the policy's to set; call "
                    "pool.autoscale(None) first to resize it by hand"
                )
            self.targets = (dedicated, spot)
            self._reconcile(self._nodes.nodes(), deallocation, _RESIZE_ORDER)
        self._loop.wake()

    def nudge(self) -> None:
        """Evaluate now: work arrived at a pool with no node to run it."""
        self._loop.wake()

    def set_policy(self, policy: Autoscale | None) -> None:
        with self._lock:
            self.policy = policy
            if policy is None:
                self._reason = "autoscale off"
        self._loop.wake()

    # -- the loop ------------------------------------------------------------------------

    def _interval(self) -> float:
        with self._lock:
            interval = self.policy.interval if self.policy is not None else SAMPLE_INTERVAL
            return min(interval, DEPARTURE_CHECK) if self._leaving else interval

    def tick(self) -> None:
        """Sample the pool; let waiting departures go; apply autoscale; record the sample."""
        with self._lock:
            if self._loop.stopping:
                return
            nodes = self._nodes.nodes()
            running, waiting = self._cluster.work_counts()
            queued = waiting + self._backlog()
            nodes = self._finish_departures(nodes)
            if any(n.state == NodeState.IDLE for n in nodes):
                self._cluster.rebalance()
            if self.policy is not None:
                self._autoscale(self.policy, nodes, running, queued)
            self._check_allocation(nodes)
            self._record(nodes, running, queued)

    def _autoscale(
        self, policy: Autoscale, nodes: list[NodeInfo], running: int, queued: int
    ) -> None:
        now = time.time()
        dedicated = _kind_counts(nodes, True, self._leaving, now)
        spot = _kind_counts(nodes, False, self._leaving, now)
        decision = decide(
            policy,
            ScalingInputs(
                now=now,
                queued_tasks=queued,
                running_tasks=running,
                slots_per_node=self._slots_per_node,
                dedicated=dedicated,
                spot=spot,
                last_scale_up=self._last_scale_up,
            ),
        )
        if decision.usable > dedicated.usable + spot.usable:
            self._last_scale_up = now
        self._reason = decision.reason
        self.targets = (decision.dedicated, decision.spot)
        # Scale-down never kills running work: nodes leave when their tasks are done.
        self._reconcile(nodes, "taskcompletion", _AUTOSCALE_ORDER)

    # -- making nodes match the targets --------------------------------------------------

    def _reconcile(
        self, nodes: list[NodeInfo], deallocation: str, order: dict[NodeState, int]
    ) -> None:
        for dedicated, target in ((True, self.targets[0]), (False, self.targets[1])):
            present = [n for n in nodes if n.dedicated == dedicated and n.id not in self._leaving]
            if len(present) < target:
                self._provider.grow_to(target, dedicated=dedicated, present=len(present))
            elif len(present) > target:
                ranked = sorted(present, key=lambda n: (order[n.state], n.since))
                self._remove(ranked[: len(present) - target], deallocation)

    def _remove(self, victims: Sequence[NodeInfo], deallocation: str) -> None:
        if deallocation == "requeue":
            self._provider.remove_nodes([n.id for n in victims])
            return
        # Even an idle node is drained first and removed once the scheduler confirms it
        # runs nothing: a task may have reached it since the nodes were listed.
        now = [n.id for n in victims if n.state in _NOT_SERVING]
        if now:
            self._provider.remove_nodes(now)
        for node in victims:
            if node.state not in _NOT_SERVING:
                self._leaving.add(node.id)
                self._nodes.set_leaving(self._leaving)
                self._cluster.drain(node.id)

    def _check_allocation(self, nodes: list[NodeInfo]) -> None:
        """While the pool holds fewer nodes than its targets, ask the provider now and then
        why (Batch keeps its resize errors: a core quota reached after the pool started,
        Spot capacity that is not there) and say so once in the log; the pool widget shows
        it too. A pool that stays short for these reasons would otherwise just look slow.
        """
        present = [n for n in nodes if n.id not in self._leaving]
        dedicated = sum(1 for n in present if n.dedicated)
        short = dedicated < self.targets[0] or len(present) - dedicated < self.targets[1]
        if not short:
            self._allocation_errors = []
            return
        now = time.monotonic()
        if now - self._allocation_checked < ALLOCATION_CHECK:
            return
        self._allocation_checked = now
        errors = self._provider.allocation_errors()
        if errors and errors != self._allocation_errors:
            logger.warning(
                "cloudmap: the pool has %d of %d dedicated and %d of %d spot nodes; the "
                "provider says: %s",
                dedicated,
                self.targets[0],
                len(present) - dedicated,
                self.targets[1],
                "; ".join(errors),
            )
        self._allocation_errors = errors

    def _finish_departures(self, nodes: list[NodeInfo]) -> list[NodeInfo]:
        """Remove the leaving nodes whose tasks are done; return the nodes that remain."""
        if not self._leaving:
            return nodes
        present = {n.id: n for n in nodes}
        done = [i for i in self._leaving if i not in present or present[i].busy_slots == 0]
        if not done:
            return nodes
        self._provider.remove_nodes([i for i in done if i in present])
        self._leaving.difference_update(done)
        self._nodes.set_leaving(self._leaving)
        return [n for n in nodes if n.id not in done]

    def _record(self, nodes: list[NodeInfo], running: int, queued: int) -> None:
        kept = [n for n in nodes if n.id not in self._leaving]
        states = Counter(
            str(NodeState.LEAVING if n.id in self._leaving else n.state) for n in nodes
        )
        self._history.append(
            ScalingSample(
                time=datetime.now(timezone.utc),
                target_dedicated=self.targets[0],
                target_spot=self.targets[1],
                dedicated=sum(1 for n in kept if n.dedicated),
                spot=sum(1 for n in kept if not n.dedicated),
                states=dict(states),
                queued_tasks=queued,
                running_tasks=running,
                reason=self._reason,
            )
        )


def _kind_counts(
    nodes: list[NodeInfo], dedicated: bool, leaving: set[str], now: float
) -> KindCounts:
    """The policy's plain numbers for one kind of node. A node serving its preemption
    notice counts as preempted already, so that its replacement starts during the notice."""
    mine = [n for n in nodes if n.dedicated == dedicated and n.id not in leaving]
    return KindCounts(
        usable=sum(1 for n in mine if n.state in _USABLE),
        idle_for=tuple(
            max(0.0, now - n.since.timestamp()) for n in mine if n.state == NodeState.IDLE
        ),
        preempted=sum(1 for n in mine if n.state in (NodeState.PREEMPTED, NodeState.LEAVING)),
        failed=sum(1 for n in mine if n.state in _FAILED),
    )
