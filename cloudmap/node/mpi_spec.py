"""One MPI run as the client describes it to its nodes, and the variables its ranks see."""

from __future__ import annotations

from dataclasses import dataclass, field

#: The port in ``AZ_BATCH_MASTER_NODE``: Batch writes ``<address>:6000`` there and reserves
#: the port for itself; scripts use the address. cloudmap keeps the format.
BATCH_MASTER_PORT = 6000


@dataclass(frozen=True)
class RunNode:
    """A node of a run: its id, its address on the pool's network, the slot that acts."""

    id: str
    host: str
    worker: str


@dataclass(frozen=True)
class MpiSpec:
    """One MPI run, as the client describes it to the nodes."""

    run_id: str
    nodes: tuple[RunNode, ...]
    ranks_per_node: int
    command: str | None = None  # command mode
    call: bytes | None = None  # Python mode: cloudpickled (fn, args, kwargs)
    coordination: str | bytes | None = None  # shell command, or cloudpickled callable
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> int:
        return len(self.nodes) * self.ranks_per_node

    def environment(self, index: int, directory: str) -> dict[str, str]:
        """The variables of node ``index``'s ranks (and coordination step): the run's
        ``env=``, cloudmap's ``CLOUDMAP_*`` names, and the same facts under the names
        Batch gives a multi-instance task (``AZ_BATCH_*``), so scripts written for Batch
        run unchanged."""
        hosts = ",".join(node.host for node in self.nodes)
        master = self.nodes[0].host
        is_master = "true" if index == 0 else "false"
        return {
            **self.env,
            "CLOUDMAP_HOST_LIST": hosts,
            "CLOUDMAP_NODE_LIST": ",".join(node.id for node in self.nodes),
            "CLOUDMAP_MASTER_NODE": master,
            "CLOUDMAP_MASTER_NODE_ID": self.nodes[0].id,
            "CLOUDMAP_IS_MASTER": is_master,
            "CLOUDMAP_TASK_SHARED_DIR": directory,
            "CLOUDMAP_RANKS_PER_NODE": str(self.ranks_per_node),
            "AZ_BATCH_HOST_LIST": hosts,
            "AZ_BATCH_MASTER_NODE": f"{master}:{BATCH_MASTER_PORT}",
            "AZ_BATCH_IS_CURRENT_NODE_MASTER": is_master,
            "AZ_BATCH_TASK_SHARED_DIR": directory,
        }
