"""The provider interface: how a pool gets, lists and gives back its nodes.

A provider subclasses :class:`Provider` and implements five methods; it is told the
scheduler's address and returns nodes whose node agent connects slots to it. Everything
else (scheduling, batching, retries, node-state merging, widgets) comes free from the pool.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..nodes import ProviderNode
from ..pricing import NodePrices

StartTask = str | Callable[[], Any] | None


@dataclass(frozen=True)
class PoolSpec:
    """The provider-independent description of a pool.

    ``nodes`` are dedicated nodes, ``spot_nodes`` spot (low-priority) ones, which the
    provider may take back at any time. ``start_task`` is a shell command or a Python
    callable run on each node before its slots join; ``env`` is added to the environment of
    the start task and every slot.
    """

    nodes: int
    slots_per_node: int = 1
    start_task: StartTask = None
    start_task_timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    spot_nodes: int = 0
    #: (url, path under the node's shared directory) pairs, downloaded as a node starts.
    resource_files: tuple[tuple[str, str], ...] = ()
    #: pip requirements installed on each node as it starts.
    packages: tuple[str, ...] = ()
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


class NodeEvents:
    """What a provider tells the pool before it takes a node away.

    The pool uses it to tell a task lost with a node it did not break (preemption, removal)
    from a crash of the task itself: the first is requeued without spending the item's
    retries. The defaults do nothing, so a provider works without a pool too.
    """

    def draining(self, node_id: str) -> None:
        """The node will leave soon (notice of preemption): give it no new task."""

    def lost(self, node_id: str) -> None:
        """The node is about to be killed: whatever it still runs is lost through no
        fault of the tasks. Called before the kill, never after."""

    def scheduler_lost(self, reason: str) -> None:
        """The node that hosts the pool's scheduler is gone (providers that host it):
        nothing can run any more, and whatever waits must fail now, with ``reason``."""


class Provider(abc.ABC):
    """Makes, lists, resizes and removes a pool's nodes.

    Subclasses provide ``start``, ``add_nodes``, ``remove_nodes``, ``list_nodes`` and
    ``close``. They must map their native node states onto the provider states of
    :class:`cloudmap.nodes.ProviderNode` and must leave nothing running after ``close``.
    """

    #: The registry name, e.g. "local" or "azure".
    name: ClassVar[str]
    #: Keyword options ``Pool(provider, ...)`` passes through to this provider.
    option_names: ClassVar[tuple[str, ...]] = ()
    #: Whether the provider has spot (low-priority) nodes, which it may preempt.
    supports_spot: ClassVar[bool] = False
    #: Whether its pools use TLS unless told otherwise (nodes on a network of others).
    tls_by_default: ClassVar[bool] = False
    #: Nodes when ``Pool(nodes=None)``; None: as many as this machine has cores.
    default_nodes: ClassVar[int | None] = None
    #: Seconds a pool waits for its first node by default; None: the pool's (120 s).
    start_timeout: ClassVar[float | None] = None

    def __init__(self, spec: PoolSpec, **options: Any) -> None:
        if options:
            from ..errors import InputError

            unknown = ", ".join(sorted(options))
            raise InputError(
                f"the {self.name!r} provider does not take {unknown}; "
                f"its options are: {', '.join(self.option_names) or 'none'}"
            )
        self.spec = spec
        self.events = NodeEvents()
        #: What slots need to join a TLS scheduler (set by the pool before ``start``);
        #: secret, so providers must deliver it to nodes without logging it.
        self.tls: dict[str, str] = {}
        #: Whether the pool's scheduler runs on a node of this provider's, not in the
        #: client (Azure's ``scheduler="node"``, decision 0008). Then ``start`` is given no
        #: address, starts the scheduler too, and :meth:`scheduler_endpoint` says where
        #: the client connects; such a pool always uses TLS.
        self.hosts_scheduler = False
        #: Seconds the client may be cut off from a scheduler it hosts before the pool fails.
        self.reconnect_timeout = 0.0

    @abc.abstractmethod
    def start(self, scheduler_address: str | None) -> None:
        """Begin making the pool's initial nodes; return without waiting for them (when
        :attr:`hosts_scheduler`, once the scheduler is up and the address is None)."""

    def scheduler_endpoint(self) -> str:
        """Where the client connects to the scheduler this provider hosts."""
        raise NotImplementedError(f"the {self.name!r} provider does not host a scheduler")

    def connection_advice(self) -> str:
        """What to check when the client cannot reach the scheduler this provider hosts."""
        return ""

    @abc.abstractmethod
    def add_nodes(self, count: int, *, dedicated: bool = True) -> list[str]:
        """Begin making ``count`` more nodes (spot ones if not ``dedicated``); return ids."""

    def grow_to(self, target: int, *, dedicated: bool, present: int) -> None:
        """Have ``target`` nodes of a kind where the pool counts ``present``: by default,
        add the difference. Providers with targets of their own (Batch) set the target
        itself, which stays right however stale ``present`` is."""
        self.add_nodes(target - present, dedicated=dedicated)

    @abc.abstractmethod
    def remove_nodes(self, node_ids: Sequence[str]) -> None:
        """Remove nodes at once, calling ``events.lost`` for each first: their running
        tasks go back to the queue (Batch's ``requeue`` deallocation)."""

    @abc.abstractmethod
    def list_nodes(self) -> list[ProviderNode]:
        """Every node the provider holds, in the provider's terms."""

    @abc.abstractmethod
    def close(self) -> None:
        """Remove every node and free every resource; idempotent."""

    @classmethod
    def plan(cls, spec: PoolSpec, **options: Any) -> dict[str, Any]:
        """What a pool of ``spec`` would ask this provider for, without making anything
        (``Pool.plan``). Providers that bill override it with their exact requests."""
        return {
            "provider": cls.name,
            "dedicated_nodes": spec.nodes,
            "spot_nodes": spec.spot_nodes,
            "slots_per_node": spec.slots_per_node,
            "requests": [],
            "notes": [f"the {cls.name!r} provider sends no requests to a cloud"],
        }

    def planned(self) -> dict[str, Any]:
        """:meth:`plan` for this provider's own pool (``pool.planned()``)."""
        return self.plan(self.spec)

    @classmethod
    def listen_address(cls, options: dict[str, Any]) -> tuple[str, int]:
        """Where the pool's scheduler listens so that this provider's nodes reach it
        (``options`` are the provider's keyword options). Local nodes: loopback."""
        return "127.0.0.1", 0

    def node_taken(self, node_id: str) -> bool:
        """Whether a node whose slots just died was taken away (preempted or removed)
        rather than broken by its work. Providers that announce every removal first (via
        ``events.lost``) need not answer; Batch reports preemption only afterwards."""
        return False

    def allocation_errors(self) -> list[str]:
        """Why the provider could not make the nodes asked for (quota, timeout), if it
        knows; the pool raises them when no node is coming."""
        return []

    def read_file(self, node_id: str, path: str) -> bytes:
        """A file from a node's directory tree (``path`` relative to its root), as Batch's
        "get file from compute node"; providers that can reach their nodes' disks override."""
        raise NotImplementedError(f"the {self.name!r} provider cannot read files from nodes")

    def describe(self) -> str:
        """A short human description for reprs, e.g. ``local processes``."""
        return self.name

    def node_size(self) -> str:
        """What one node is, for displays: a VM size such as ``Standard_D4s_v5``."""
        slots = self.spec.slots_per_node
        return f"{slots} slot{'s' if slots != 1 else ''} per node"

    def prices(self) -> NodePrices | None:
        """Hourly prices of this pool's nodes, or None where the provider does not know."""
        return None
