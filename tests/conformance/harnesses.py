"""The conformance harnesses of cloudmap's own providers: local processes, and Azure Batch on
the local Batch emulator (tests/batch_emulator), whose nodes run the provider's real start
task as local processes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import cloudpickle

import cloudmap
from cloudmap.providers.local import LocalProvider
from cloudmap.testing import ProviderHarness, mpi_tasks, tasks
from cloudmap.testing.processes import kill_node_processes

from ..batch_emulator import BatchEmulator, cloudmap_uses, running_batch_emulator

#: What nodes on this machine let every harness do, whatever makes them.
ON_THIS_MACHINE = frozenset({"break_node", "kill_agent", "kill_slot", "local_nodes", "mpi"})


class LocalHarness(ProviderHarness):
    """Node processes on this machine: the provider injects its own faults."""

    provider = "local"
    capabilities = ON_THIS_MACHINE | {
        "spot",
        "preempt",
        "preempt_notice",
        "restore",
        "restoring_state",
        "evict",
    }

    def preempt(self, pool: cloudmap.Pool, node_id: str, *, notice: float | None = None) -> None:
        provider = _local(pool)
        if notice is None:
            provider.preempt(node_id)
        else:
            provider.preempt(node_id, notice=notice)

    @contextlib.contextmanager
    def restoring(self, seconds: float) -> Iterator[dict[str, Any]]:
        yield {"restore_after": seconds}

    def evicting(self, eviction: cloudmap.Eviction) -> dict[str, Any]:
        return {"eviction": eviction}

    def preemptions(self, pool: cloudmap.Pool) -> list[tuple[float, str]]:
        return list(_local(pool).preemptions)

    def break_node(self, pool: cloudmap.Pool, node_id: str) -> None:
        # A local node is its processes: killing them all is the whole node failing.
        self.kill_cloudmap_on(pool, node_id)

    def kill_cloudmap_on(self, pool: cloudmap.Pool, node_id: str) -> None:
        kill_node_processes(str(_local(pool).node_root(node_id)))


class AzureEmulatorHarness(ProviderHarness):
    """Azure Batch against the emulator: its admin helpers cause what Azure would. Batch
    gives no notice of preemption through its API (a VM hears of it from Azure's scheduled
    events, which the emulator does not model), nor says that a preempted node comes back."""

    provider = "azure"
    capabilities = ON_THIS_MACHINE | {"spot", "preempt", "restore"}
    #: Batch nodes do not see the client's modules: the test functions travel by value, as a
    #: user's own modules would (or with packages=).
    by_value = (tasks, mpi_tasks)
    batch: BatchEmulator
    directory: Path

    @contextlib.contextmanager
    def running(self, directory: Path) -> Iterator[None]:
        for module in self.by_value:
            cloudpickle.register_pickle_by_value(module)
        self.directory = directory
        try:
            with running_batch_emulator(directory, node_start_delay=0.05, page_size=50) as batch:
                self.batch = batch
                with cloudmap_uses(batch):
                    yield
        finally:
            for module in self.by_value:
                cloudpickle.unregister_pickle_by_value(module)

    def preempt(self, pool: cloudmap.Pool, node_id: str, *, notice: float | None = None) -> None:
        if notice is not None:
            raise self.missing("preempt_notice")
        self.batch.preempt(_pool_id(pool), node_id)

    @contextlib.contextmanager
    def restoring(self, seconds: float) -> Iterator[dict[str, Any]]:
        self.batch.restore_preempted_after(seconds)
        try:
            yield {}
        finally:
            self.batch.restore_preempted_after(None)

    def break_node(self, pool: cloudmap.Pool, node_id: str) -> None:
        self.batch.break_node(_pool_id(pool), node_id)

    def kill_cloudmap_on(self, pool: cloudmap.Pool, node_id: str) -> None:
        kill_node_processes(str(self.batch.node_dir(_pool_id(pool), node_id)))

    def node_directories(self) -> list[str]:
        # A Batch node's agent outlives the start task that began it: nobody's child.
        return [str(self.directory)]


def _local(pool: cloudmap.Pool) -> LocalProvider:
    """The pool's provider, whose fault injection (preempt, preemptions) the harness uses."""
    return cast(LocalProvider, pool.provider)


def _pool_id(pool: cloudmap.Pool) -> str:
    return str(pool.provider.pool_id)  # type: ignore[union-attr]
