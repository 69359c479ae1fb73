"""The conformance suite runs against every provider listed here.

"azure" is the Azure Batch provider against the local Batch emulator (tests/batch_emulator),
whose nodes run the provider's real start task as local processes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import cloudmap

from . import mpi_tasks, tasks

TASK_MODULES = (tasks.__name__, mpi_tasks.__name__)
#: The Batch emulator of the running "azure" module, for faults only Azure can cause.
EMULATORS: dict[str, Any] = {}


def break_node(pool: cloudmap.Pool, node_id: str) -> None:
    """The node fails as a whole, as a VM can: its processes die and it is unusable."""
    if pool.provider is not None and pool.provider.name == "azure":
        EMULATORS["azure"].break_node(pool.provider.pool_id, node_id)  # type: ignore[attr-defined]
        return
    kill_cloudmap_on(pool, node_id)


def kill_cloudmap_on(pool: cloudmap.Pool, node_id: str) -> None:
    """Kill cloudmap's processes on a node (its agent and slots), and only those: a Batch
    node stays "idle" to Batch, as a VM whose agent was killed (out of memory) would."""
    from .. import conftest as session

    if pool.provider is not None and pool.provider.name == "azure":
        emulator = EMULATORS["azure"]
        root = str(emulator.node_dir(pool.provider.pool_id, node_id))  # type: ignore[attr-defined]
    else:
        root = str(pool.provider.root / node_id)  # type: ignore[union-attr]
    for process in session.cloudmap_processes():
        if root in " ".join(process.cmdline()):
            process.kill()


def preempt(pool: cloudmap.Pool, node_id: str, notice: float | None = None) -> None:
    """Take a spot node away. Batch gives no notice through its API (a VM hears of it from
    Azure's scheduled events, which the emulator does not model): ``notice`` is the local
    provider's only."""
    if pool.provider is not None and pool.provider.name == "azure":
        EMULATORS["azure"].preempt(pool.provider.pool_id, node_id)  # type: ignore[attr-defined]
    elif notice is None:
        pool.provider.preempt(node_id)  # type: ignore[union-attr]
    else:
        pool.provider.preempt(node_id, notice=notice)  # type: ignore[union-attr]


def restoring(provider: str, seconds: float) -> dict[str, Any]:
    """Pool options (or emulator settings) that bring preempted nodes back after
    ``seconds``: the local provider's ``restore_after``; Batch restores by itself."""
    if provider == "azure":
        EMULATORS["azure"].restore_preempted_after(seconds)
        return {}
    return {"restore_after": seconds}


def local_only(provider: str, why: str) -> None:
    """Skip a test of a local provider feature (fault injection, options) on others."""
    if provider != "local":
        pytest.skip(f"the local provider's own feature: {why}")


PROVIDERS = ["local", "azure"]


@pytest.fixture(scope="module", params=PROVIDERS)
def provider(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param != "azure":
        yield str(request.param)
        return
    from ..batch_emulator import cloudmap_uses, running_batch_emulator

    # Batch nodes do not see the client's files: the test functions travel by value, as
    # a user's own modules would (or with packages=).
    modules = [sys.modules[name] for name in TASK_MODULES]
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    root: Path = tmp_path_factory.mktemp("batch")
    try:
        with running_batch_emulator(root, node_start_delay=0.05, page_size=50) as batch:
            EMULATORS["azure"] = batch
            with cloudmap_uses(batch):
                yield "azure"
    finally:
        EMULATORS.pop("azure", None)
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture(scope="module")
def pool(provider: str) -> Iterator[cloudmap.Pool]:
    """A two-node pool shared by the tests of one module that do not disturb it."""
    with cloudmap.Pool(provider, nodes=2, slots_per_node=1) as shared:
        shared.wait_for_nodes()
        yield shared
