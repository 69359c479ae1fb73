"""The autoscale policy: how many nodes of each kind a pool should have, from plain numbers.

Pure logic, no threads and no I/O, so it is unit-tested directly; the pool samples its
nodes and queue every ``Autoscale.interval`` seconds, calls :func:`decide` and applies the
targets. The rule has hysteresis so the pool never flaps (Dask's own ``adapt`` is known to
add and remove workers in the same breath):

* Demand is the tasks queued plus the tasks running; it wants ``ceil(demand / slots)``
  nodes, kept within ``[min_nodes, max_nodes - failed]``. Failed nodes take up room under
  the maximum, so a broken start task cannot make the pool grow without bound.
* Scaling up is immediate (work is waiting), by at most ``step`` usable nodes at a time.
* Scaling down waits: only nodes idle for ``idle_timeout`` seconds are removed, at most
  ``step`` at a time, never below ``min_nodes``, and never within ``idle_timeout`` of the
  last scale-up, so a short lull between two bursts of work does not return nodes that
  are about to be needed again. One evaluation never scales both ways.

Kinds: new capacity goes to the preferred kind (spot nodes with ``spot=True``, else
dedicated), except that with ``spot=True`` the first ``min_nodes`` are dedicated, so the
floor of the pool survives spot evictions. Nodes of the other kind that already exist
(a pool that once ran with the other setting, or dedicated nodes above ``min_nodes``) are
kept while the demand needs them and are the first to be removed once idle.

Targets follow Azure Batch's ``targetDedicatedNodes`` / ``targetLowPriorityNodes``: the
service counts preempted and failed nodes toward the current size, so each target is the
usable target of its kind plus that kind's preempted and failed nodes; otherwise evicted
capacity would never be replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .validation import check_int, check_positive


@dataclass(frozen=True)
class Autoscale:
    """User settings: ``cloudmap.Autoscale(min_nodes=0, max_nodes=8, spot=True, idle_timeout=60)``.

    Attributes
    ----------
    min_nodes : int
        Usable nodes kept even with no work (dedicated ones when ``spot=True``).
    max_nodes : int
        Upper bound on usable plus failed nodes (preempted spot nodes cost nothing and are
        not counted).
    spot : bool
        Put the capacity above ``min_nodes`` on spot (low-priority) nodes: cheaper, but
        they may be preempted, in which case they are replaced.
    idle_timeout : float
        Seconds a node must be idle before it may be removed, and seconds after a scale-up
        during which nothing is removed.
    step : int
        At most this many usable nodes added or removed per evaluation, so one burst of
        submissions does not allocate the whole maximum before any timing is known.
    interval : float
        Seconds between evaluations (used by the pool's loop, not by :func:`decide`).
    """

    min_nodes: int = 0
    max_nodes: int = 8
    spot: bool = False
    idle_timeout: float = 60.0
    step: int = 4
    interval: float = 1.0

    def __post_init__(self) -> None:
        # Checked here, once, so that a bad setting fails where the user wrote it and not
        # later inside the pool's background loop.
        check_int("min_nodes", self.min_nodes, minimum=0)
        check_int("max_nodes", self.max_nodes, minimum=1)
        check_int("step", self.step, minimum=1)
        if self.min_nodes > self.max_nodes:
            raise InputError(
                f"min_nodes={self.min_nodes} is more than max_nodes={self.max_nodes}; "
                "pass min_nodes <= max_nodes"
            )
        if not isinstance(self.spot, bool):
            raise InputError(f"spot={self.spot!r} is not valid: pass True or False")
        timeout = self.idle_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise InputError(
                f"idle_timeout={timeout!r} is not valid: pass a number of seconds >= 0"
            )
        check_positive("interval", self.interval)


@dataclass(frozen=True)
class KindCounts:
    """Nodes of one kind (dedicated or spot), as plain numbers.

    Attributes
    ----------
    usable : int
        Nodes creating, starting, idle or running: serving now or on the way.
    idle_for : tuple of float
        Seconds each currently idle node has been idle (these nodes are among ``usable``).
    preempted : int
        Spot nodes evicted by the service; still counted toward the kind's current size.
    failed : int
        Nodes whose start task failed or that became unusable; kept for inspection.
    """

    usable: int = 0
    idle_for: tuple[float, ...] = ()
    preempted: int = 0
    failed: int = 0


@dataclass(frozen=True)
class ScalingInputs:
    """One snapshot of the pool, taken by the pool's loop before each evaluation.

    ``queued_tasks`` includes work not yet submitted to the cluster, so a large map is seen
    whole and not only its first window. ``last_scale_up`` is when :func:`decide` last
    raised the usable target (None: never); the pool records it from the decisions.
    """

    now: float
    queued_tasks: int
    running_tasks: int
    slots_per_node: int
    dedicated: KindCounts
    spot: KindCounts
    last_scale_up: float | None


@dataclass(frozen=True)
class ScalingDecision:
    """What the pool should ask for, in Azure Batch's terms.

    Attributes
    ----------
    dedicated : int
        Target dedicated node count, as ``targetDedicatedNodes``: includes failed nodes kept.
    spot : int
        Target spot node count, as ``targetLowPriorityNodes``: includes preempted and failed
        spot nodes.
    usable : int
        The usable node total the policy aims at.
    reason : str
        A short explanation, starting with "scale up", "scale down" or "hold".
    """

    dedicated: int
    spot: int
    usable: int
    reason: str


def decide(policy: Autoscale, inputs: ScalingInputs) -> ScalingDecision:
    """The node targets for one evaluation of ``policy`` on the snapshot ``inputs``.

    >>> none = KindCounts()
    >>> decision = decide(Autoscale(), ScalingInputs(0.0, 37, 0, 1, none, none, None))
    >>> decision.dedicated, decision.spot, decision.reason
    (4, 0, 'scale up: 37 tasks for 0 nodes, target 4')
    """
    dedicated, spot = inputs.dedicated, inputs.spot
    # The counts are snapshots taken by another thread: never let a stray negative or a
    # zero slot count turn into a division error or a negative target.
    slots = max(1, inputs.slots_per_node)
    demand = max(0, inputs.queued_tasks) + max(0, inputs.running_tasks)
    failed = max(0, dedicated.failed) + max(0, spot.failed)
    cap = max(0, policy.max_nodes - failed)
    floor = min(policy.min_nodes, cap)
    needed = -(-demand // slots)
    wanted = min(max(needed, floor), cap)
    usable_now = max(0, dedicated.usable) + max(0, spot.usable)
    capped = ""
    if needed > cap and failed:
        capped = f" ({_count(failed, 'failed node')} within max_nodes={policy.max_nodes})"

    if wanted > usable_now:
        new = min(wanted, usable_now + policy.step)
        add_dedicated, add_spot = _split_added(policy, dedicated, new - usable_now)
        if needed > usable_now:
            why = f"{_count(demand, 'task')} for {_count(usable_now, 'node')}"
        else:
            why = f"min_nodes={policy.min_nodes}, {_count(usable_now, 'node')}"
        return _decision(
            dedicated,
            spot,
            max(0, dedicated.usable) + add_dedicated,
            max(0, spot.usable) + add_spot,
            f"scale up: {why}, target {new}{capped}",
        )

    keep_dedicated, keep_spot = max(0, dedicated.usable), max(0, spot.usable)
    if wanted == usable_now:
        return _decision(
            dedicated,
            spot,
            keep_dedicated,
            keep_spot,
            f"hold: {_count(usable_now, 'node')} for {_count(demand, 'task')}{capped}",
        )

    # wanted < usable_now: more nodes than the work needs.
    surplus = usable_now - wanted
    if inputs.last_scale_up is not None:
        since = inputs.now - inputs.last_scale_up
        if since < policy.idle_timeout:
            return _decision(
                dedicated,
                spot,
                keep_dedicated,
                keep_spot,
                f"hold: {_count(surplus, 'node')} spare, scaled up {_seconds(since)} ago",
            )
    idle_dedicated = _idle_long(dedicated, policy.idle_timeout)
    idle_spot = _idle_long(spot, policy.idle_timeout)
    if policy.spot:
        # The first min_nodes stay dedicated, so only dedicated nodes above it may go.
        idle_dedicated = min(idle_dedicated, max(0, keep_dedicated - policy.min_nodes))
    lowest = max(wanted, policy.min_nodes)  # min_nodes wins even when failures cap wanted
    remove = min(policy.step, usable_now - lowest, idle_dedicated + idle_spot)
    if remove <= 0:
        if usable_now <= policy.min_nodes:
            why = f"min_nodes={policy.min_nodes}"
        else:
            why = f"none idle {_seconds(policy.idle_timeout)} yet"
        return _decision(
            dedicated,
            spot,
            keep_dedicated,
            keep_spot,
            f"hold: {_count(surplus, 'node')} spare, {why}",
        )
    # Idle nodes of the kind not preferred go first: they are the ones the settings no
    # longer ask for. Only idle nodes are counted per kind, so no busy node is targeted.
    if policy.spot:
        from_dedicated = min(remove, idle_dedicated)
        from_spot = remove - from_dedicated
    else:
        from_spot = min(remove, idle_spot)
        from_dedicated = remove - from_spot
    return _decision(
        dedicated,
        spot,
        keep_dedicated - from_dedicated,
        keep_spot - from_spot,
        f"scale down: {_count(remove, 'node')} idle >= {_seconds(policy.idle_timeout)}, "
        f"target {usable_now - remove}",
    )


def _split_added(policy: Autoscale, dedicated: KindCounts, added: int) -> tuple[int, int]:
    """(dedicated, spot) shares of ``added`` new usable nodes.

    With ``spot=True`` the dedicated floor is filled first, so the pool's minimum never
    depends on spot capacity; everything else goes to the preferred kind.
    """
    if not policy.spot:
        return added, 0
    to_dedicated = min(added, max(0, policy.min_nodes - max(0, dedicated.usable)))
    return to_dedicated, added - to_dedicated


def _idle_long(kind: KindCounts, idle_timeout: float) -> int:
    """How many nodes of ``kind`` have been idle long enough to be removed."""
    return min(max(0, kind.usable), sum(1 for idle in kind.idle_for if idle >= idle_timeout))


def _decision(
    dedicated: KindCounts, spot: KindCounts, usable_dedicated: int, usable_spot: int, reason: str
) -> ScalingDecision:
    """Turn usable targets into service targets, which count preempted and failed nodes."""
    return ScalingDecision(
        dedicated=usable_dedicated + max(0, dedicated.preempted) + max(0, dedicated.failed),
        spot=usable_spot + max(0, spot.preempted) + max(0, spot.failed),
        usable=usable_dedicated + usable_spot,
        reason=reason,
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.3g} s"
