"""The provider harness: what a provider's test module writes to run the conformance suite.

A provider's tests subclass :class:`ProviderHarness` once, naming the provider, the pool
options every test pool needs and the capabilities the provider (and the harness) has, and
implementing the fault action of each capability declared. Each conformance class is then
mixed in with it (``class TestMap(MyHarness, MapTests): pass``), as fsspec's abstract tests
are mixed in with a filesystem's fixtures.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psutil
import pytest

import cloudmap

from .capabilities import CAPABILITIES, check_known, skip_undeclared
from .processes import node_processes

if TYPE_CHECKING:
    from cloudmap import Eviction, Pool


class MissingCapabilityError(cloudmap.CloudmapError, NotImplementedError):
    """A test used a fault action whose capability its harness does not declare."""


class ProviderHarness:
    """How the conformance suite drives one provider.

    A subclass sets:

    ``provider``
        The registry name, as given to ``cloudmap.Pool(provider, ...)``.
    ``pool_options``
        Options every test pool gets (a region, a VM size, credentials...).
    ``capabilities``
        A frozenset of names from :data:`cloudmap.testing.CAPABILITIES`. Tests needing a
        capability not in it are skipped with a reason that names it.

    and implements, for each capability it declares, its fault action: :meth:`preempt`
    ("preempt", "preempt_notice"), :meth:`restoring` ("restore"), :meth:`evicting` and
    :meth:`preemptions` ("evict"), :meth:`break_node` ("break_node"),
    :meth:`kill_cloudmap_on` ("kill_agent"). :meth:`running` starts and stops whatever the
    provider needs around a class of tests (an emulator, say).

    It gets for free: the class-scoped ``harness`` fixture (an instance of the test class,
    inside :meth:`running`; tests reach the fault actions through it), the class-scoped ``pool``
    fixture (two nodes of one slot, shared by the tests that do not disturb it),
    :meth:`make_pool`, and, for nodes on this machine ("local_nodes"), :meth:`kill_slot`
    and :meth:`node_processes`.

    Examples
    --------
    >>> class MyCloudHarness(ProviderHarness):
    ...     provider = "mycloud"
    ...     pool_options = {"region": "test"}
    ...     capabilities = frozenset({"spot", "preempt", "break_node"})
    ...     def preempt(self, pool, node_id, *, notice=None):
    ...         pool.provider.api.evict(node_id)
    ...     def break_node(self, pool, node_id):
    ...         pool.provider.api.fail(node_id)
    """

    provider: ClassVar[str] = ""
    pool_options: ClassVar[Mapping[str, Any]] = {}
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        try:
            check_known(cls.capabilities)
        except ValueError as exc:
            raise TypeError(f"{cls.__qualname__}.capabilities: {exc}") from None
        if cls.provider:
            skip_undeclared(cls, cls.capabilities, cls.provider)

    def can(self, capability: str) -> bool:
        """Whether this harness declares ``capability`` (for tests that only adapt to it)."""
        check_known([capability])
        return capability in self.capabilities

    # -- around the tests -----------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, directory: Path) -> Iterator[None]:
        """Start what the provider needs for a class of tests (``directory`` is theirs to
        use) and stop it on leaving, also after a failure. By default: nothing."""
        yield

    def make_pool(self, **options: Any) -> Pool:
        """A pool of this provider with the harness's ``pool_options`` and ``options``."""
        return cloudmap.Pool(self.provider, **{**self.pool_options, **options})

    # -- fault actions, one per capability --------------------------------------------------

    def preempt(self, pool: Pool, node_id: str, *, notice: float | None = None) -> None:
        """Take spot node ``node_id`` away, as the cloud does when it needs the capacity;
        with ``notice`` seconds of warning first ("preempt_notice"), else at once."""
        raise self.missing("preempt_notice" if notice is not None else "preempt")

    @contextlib.contextmanager
    def restoring(self, seconds: float) -> Iterator[dict[str, Any]]:
        """Within the block, preempted nodes come back ``seconds`` after they went; yields
        the pool options that ask for that (empty where the provider does it by itself)."""
        raise self.missing("restore")
        yield {}  # pragma: no cover - makes this a generator for contextmanager

    def evicting(self, eviction: Eviction) -> dict[str, Any]:
        """Pool options under which the provider preempts spot nodes at random, as
        ``eviction`` describes."""
        raise self.missing("evict")

    def preemptions(self, pool: Pool) -> list[tuple[float, str]]:
        """(time, node id) of every preemption of ``pool``'s nodes so far ("evict")."""
        raise self.missing("evict")

    def break_node(self, pool: Pool, node_id: str) -> None:
        """The node fails as a whole, as a VM can: its processes die and it is unusable."""
        raise self.missing("break_node")

    def kill_cloudmap_on(self, pool: Pool, node_id: str) -> None:
        """Kill cloudmap's processes on a node (agent and slots), and only those: the
        provider keeps calling the node healthy, as a VM whose agent ran out of memory."""
        raise self.missing("kill_agent")

    def kill_slot(self, pool: Pool, rng: random.Random) -> bool:
        """SIGKILL one of ``pool``'s slot processes chosen with ``rng``; False if none ran.
        A slot's command line names its scheduler, so other pools' slots are safe."""
        self._needs("kill_slot")
        slots = node_processes(
            "cloudmap.node.slot", pool.scheduler_address, under=self.node_directories()
        )
        if not slots:
            return False
        try:
            rng.choice(slots).kill()
        except psutil.NoSuchProcess:
            return False
        return True

    # -- looking at nodes on this machine ("local_nodes") -----------------------------------

    def node_processes(self, marker: str = "cloudmap.node") -> list[psutil.Process]:
        """This harness's node processes still alive whose command line has ``marker``:
        those started by this process or running from :meth:`node_directories`."""
        self._needs("local_nodes")
        return node_processes(marker, under=self.node_directories())

    def node_directories(self) -> list[str]:
        """Directories the provider's nodes run from when they are not this process's
        descendants (a Batch node's agent outlives its start task). By default none."""
        return []

    # -- fixtures --------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def harness(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderHarness]:
        """A harness of this class, running for the tests of one class."""
        harness = cls()
        with harness.running(tmp_path_factory.mktemp(cls.provider)):
            yield harness

    @pytest.fixture(scope="class")
    @classmethod
    def pool(cls, harness: ProviderHarness) -> Iterator[Pool]:
        """A two-node pool shared by the tests of one class that do not disturb it."""
        with harness.make_pool(nodes=2, slots_per_node=1) as shared:
            shared.wait_for_nodes()
            yield shared

    # -- what a fault action raises when it cannot --------------------------------------------

    def missing(self, capability: str) -> MissingCapabilityError:
        """The error for a fault action asked to do what this harness cannot (raise it)."""
        if self.can(capability):
            declared = "declares it but does not implement it"
        else:
            declared = "does not declare it"
        return MissingCapabilityError(
            f"this test needs the capability {capability!r} "
            f"({CAPABILITIES[capability]}); the {self.provider!r} harness {declared}"
        )

    def _needs(self, capability: str) -> None:
        """Raise :meth:`missing` unless the capability is declared (for actions given here)."""
        if not self.can(capability):
            raise self.missing(capability)
