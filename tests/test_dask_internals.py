"""The private parts of Dask that cloudmap relies on still exist, in the versions it pins.

cloudmap keeps Dask's internals inside the cluster layer (cluster, scheduler_plugin and the
slot runner) and lists each one in ``cloudmap.dask_config.PRIVATE_DASK_API``. A release of
``distributed`` that renames one fails here, naming it, instead of somewhere in a map.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import pytest
from distributed import Client, LocalCluster
from distributed.scheduler import KilledWorker
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from cloudmap.dask_config import DISTRIBUTED_VERSIONS, PRIVATE_DASK_API

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def live() -> Iterator[dict[str, Any]]:
    """One of each owner in PRIVATE_DASK_API, alive: a scheduler, a worker and a client
    in this process, holding the result of one task (so both sides keep its state)."""
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        future = client.submit(sum, [1, 2], key="cloudmap-probe")
        assert future.result(timeout=30) == 3
        scheduler = cluster.scheduler
        worker = next(iter(cluster.workers.values()))
        deadline = time.monotonic() + 10
        while "cloudmap-probe" not in worker.state.tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        yield {
            "Scheduler": scheduler,
            "Scheduler.TaskState": scheduler.tasks["cloudmap-probe"],
            "Scheduler.WorkerState": next(iter(scheduler.workers.values())),
            "Client": client,
            "BatchedSend": client.scheduler_comm,
            "KilledWorker": KilledWorker("cloudmap-probe", None, 0),
            "distributed.worker": distributed.worker,
            "Worker": worker,
            "Worker.TaskState": worker.state.tasks["cloudmap-probe"],
            "Broker": scheduler._broker,
            "Topic": scheduler._broker._topics["cloudmap-probe-topic"],
        }
        future.release()


@pytest.mark.parametrize(
    ("owner", "attribute", "used_by"),
    PRIVATE_DASK_API,
    ids=[f"{o}.{a}" for o, a, _ in PRIVATE_DASK_API],
)
def test_private_dask_part_still_exists(
    live: dict[str, Any], owner: str, attribute: str, used_by: str
) -> None:
    assert hasattr(live[owner], attribute), (
        f"distributed {distributed.__version__} has no {owner}.{attribute}, which {used_by}; "
        f"cloudmap was tested with distributed{DISTRIBUTED_VERSIONS}: install that, or adapt "
        "the code named and widen the pin in pyproject.toml and cloudmap/dask_config.py"
    )


def test_installed_distributed_is_in_the_pinned_range() -> None:
    assert Version(distributed.__version__) in SpecifierSet(DISTRIBUTED_VERSIONS), (
        f"distributed {distributed.__version__} is outside {DISTRIBUTED_VERSIONS}, the range "
        "cloudmap's suite has run on"
    )


def test_pyproject_pins_the_same_range() -> None:
    text = PYPROJECT.read_text()
    for package in ("distributed", "dask"):
        pin = re.search(rf'"{package}([^"]*)"', text)
        assert pin is not None, f"pyproject.toml does not list {package}"
        assert SpecifierSet(pin.group(1)) == SpecifierSet(DISTRIBUTED_VERSIONS), (
            f"pyproject.toml pins {package}{pin.group(1)}; cloudmap/dask_config.py says "
            f"{DISTRIBUTED_VERSIONS}: keep them the same"
        )
