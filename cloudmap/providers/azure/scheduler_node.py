"""The pool node that hosts the scheduler (``scheduler="node"``, decision 0008).

A client outside the pool's network (a laptop) cannot be reached by the nodes, nor reach
their private addresses; it can connect out. So the scheduler runs on one dedicated node
of the pool, which Batch exposes through the pool's inbound NAT endpoint (a public address
and port, open only to ``allow_from``), and the slots of the other nodes join it over the
pool's own network.

The pool starts in two steps. First it holds only the scheduler's node, whose start task
starts the scheduler and ends once it listens; Batch then lists that node's private
address and its public endpoint. Then the pool's start task becomes the slots' one,
pointed at the private address, and the pool grows to its targets (Batch runs a changed
start task on the nodes that join after the change). The scheduler's node is never
counted, removed or preempted by cloudmap, and its loss ends the pool with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import PoolStartError
from ...loops import poll_until
from .states import provider_state

#: Seconds between looks at the scheduler's node while it starts.
POLL = 0.2


@dataclass(frozen=True)
class SchedulerNode:
    """Where the scheduler runs: its node, its address inside the pool's network (for the
    slots) and outside it (for the client)."""

    node_id: str
    internal: str
    public: str

    def lost_reason(self, nodes: list[Any]) -> str | None:
        """Why the scheduler is gone, from a Batch node listing; None while it serves."""
        node = next((n for n in nodes if n.id == self.node_id), None)
        if node is None:
            return f"the node {self.node_id} that hosted the pool's scheduler left the pool"
        if provider_state(node.state) != "ready":
            state = getattr(node.state, "value", node.state)
            return f"the node {self.node_id} that hosts the pool's scheduler is {state}"
        return None


def wait_for_scheduler_node(
    client: Any, pool_id: str, backend_port: int, read_output: Any, timeout: float
) -> SchedulerNode:
    """Wait until the pool's one node has started the scheduler; raise
    :class:`~cloudmap.PoolStartError` with its start task's output if it could not, or
    with Batch's resize errors if Batch could not allocate it."""

    def started() -> SchedulerNode | None:
        nodes = list(client.list_nodes(pool_id))
        for node in nodes:
            state = provider_state(node.state)
            if state == "ready":
                return _located(node, backend_port)
            if state in ("start_failed", "unusable"):
                raise PoolStartError(
                    f"the node {node.id} could not start the pool's scheduler (Batch says "
                    f"{getattr(node.state, 'value', node.state)}); the pool was removed. Its "
                    f"start task's output:\n{read_output(node.id)}",
                    [],
                )
        if not nodes:
            pool = client.get_pool(pool_id)
            errors = [f"{e.code}: {e.message}" for e in (pool.resize_errors or [])]
            if errors and str(getattr(pool.allocation_state, "value", "")).lower() == "steady":
                raise PoolStartError(
                    "Batch could not allocate the node for the pool's scheduler: "
                    + "; ".join(errors)
                    + ". The pool was removed.",
                    [],
                )
        return None

    def too_late(_: object) -> PoolStartError:
        return PoolStartError(
            f"the node for the pool's scheduler did not start within {timeout:g} s; "
            "the pool was removed",
            [],
        )

    found = poll_until(started, timeout, interval=POLL, on_timeout=too_late)
    assert found is not None
    return found


def _located(node: Any, backend_port: int) -> SchedulerNode:
    endpoints = getattr(node.endpoint_configuration, "inbound_endpoints", None) or []
    endpoint = next((e for e in endpoints if e.backend_port == backend_port), None)
    if endpoint is None or not node.ip_address:
        raise PoolStartError(
            f"Batch lists no public endpoint for port {backend_port} of node {node.id}, "
            "which hosts the pool's scheduler (networkConfiguration.endpointConfiguration); "
            "the pool was removed",
            [],
        )
    return SchedulerNode(
        node_id=node.id,
        internal=f"tls://{node.ip_address}:{backend_port}",
        public=f"tls://{endpoint.public_ip_address}:{endpoint.frontend_port}",
    )
