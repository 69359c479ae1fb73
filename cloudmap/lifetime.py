"""A pool's start and end: waiting for its first slot with a deadline, and tearing it down.

A new pool waits until one slot can take work, and gives up early, with the reason, when
every node failed or the provider says it cannot allocate any; a pool that fails to start
leaves no node behind. Teardown stops the parts in the order that loses nothing: the
scaler first (it must not act on a closing pool), the client before the nodes (no future
may hold results on nodes being removed), then the scheduler, then the nodes.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from .errors import PoolStartError
from .loops import poll_until
from .nodes import FINAL_STATES, ProviderNode
from .providers.base import NodeEvents, PoolSpec, Provider

if TYPE_CHECKING:
    from .cluster import DaskCluster
    from .scaling import Scaler

#: Seconds between asking the provider why no node is on the way (quota, timeout).
START_ALLOCATION_CHECK = 1.0


def wait_for_first_slot(
    cluster: DaskCluster, provider: Provider, spec: PoolSpec, timeout: float
) -> None:
    """Return once a slot has joined; raise :class:`~cloudmap.PoolStartError` when none
    will (every node failed, the provider cannot allocate) or none did within ``timeout``."""
    nodes: list[ProviderNode] = []
    next_check = time.monotonic() + START_ALLOCATION_CHECK

    def joined() -> bool:
        nonlocal nodes, next_check
        if cluster.slot_count(max_age=0):
            return True
        nodes = provider.list_nodes()
        failed = [n for n in nodes if n.state in FINAL_STATES]
        if nodes and len(failed) == len(nodes):
            raise PoolStartError(_start_failure_message(nodes, spec), nodes)
        if len(failed) == len(nodes) and time.monotonic() > next_check:
            # Nothing on the way: did the provider say why (quota, allocation timeout)?
            next_check = time.monotonic() + START_ALLOCATION_CHECK
            errors = provider.allocation_errors()
            if errors:
                raise PoolStartError(
                    "the provider could not allocate the pool's nodes: "
                    + "; ".join(errors)
                    + ". The pool was removed.",
                    nodes,
                )
        return False

    def too_late(_: bool) -> PoolStartError:
        return PoolStartError(
            f"no node of the pool became ready within start_timeout={timeout:g} s "
            f"(states: {', '.join(f'{n.id}={n.state}' for n in nodes)}); the pool was "
            "removed. Raise start_timeout= or check the start task.",
            nodes,
        )

    poll_until(joined, timeout, interval=0.02, on_timeout=too_late)


def _start_failure_message(nodes: list[ProviderNode], spec: PoolSpec) -> str:
    first = nodes[0]
    step = "start task"
    if spec.resource_files or spec.packages:
        setup = "node setup (resource files, packages)"
        step = f"{step} or {setup}" if spec.start_task is not None else setup
    message = f"no node of the pool could start: {len(nodes)} node(s) {first.state}."
    if first.start_task is not None:
        message += f" The {step} of {first.id} exited with {first.start_task.exit_code}"
        for stream in ("stdout", "stderr"):
            tail = getattr(first.start_task, stream).strip()[-1500:]
            if tail:
                message += f"\n--- {stream} (end) ---\n{tail}"
        message += f"\nFix the {step} and create the pool again."
    elif first.reason:
        message += f" {first.id}: {first.reason}\nThe pool was removed."
    else:
        message += " Check the node logs; the pool was removed."
    return message


class ClusterNodeEvents(NodeEvents):
    """Passes a provider's word about departing nodes to the scheduler (see NodeEvents)."""

    def __init__(self, cluster: DaskCluster) -> None:
        self._cluster = cluster

    def draining(self, node_id: str) -> None:
        with contextlib.suppress(Exception):  # a closing pool schedules nothing anyway
            self._cluster.drain(node_id)

    def lost(self, node_id: str) -> None:
        self._cluster.mark_lost(node_id)

    def scheduler_lost(self, reason: str) -> None:
        self._cluster.fail(reason)


def teardown(scaler: Scaler | None, provider: Provider | None, cluster: DaskCluster) -> None:
    """Stop a pool's parts in order (see the module docstring); safe on a half-made pool."""
    try:
        if scaler is not None:
            scaler.stop()
        if provider is not None:
            provider.events = NodeEvents()  # nobody to tell: every task is being dropped
        cluster.close_client()  # first, so no future holds results on nodes being removed
    finally:
        try:
            # The scheduler before the nodes: one that watches its slots leave tells every
            # remaining slot of each departure, which at 16,000 slots takes minutes, while
            # closing it first drops them all at once.
            cluster.close()
        finally:
            if provider is not None:
                provider.close()
