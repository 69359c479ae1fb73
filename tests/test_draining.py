"""Draining a node's slots on the real scheduler: a node given back and drained again at
once (one MPI run ending, the next taking the same nodes) must not be handed queued tasks
that its paused slots would never run."""

from __future__ import annotations

import time
from typing import Any

import cloudmap
from cloudmap.nodes import node_of

from .conftest import eventually


def _scheduler_statuses(dask_scheduler: Any) -> dict[str, str]:
    return {str(ws.name): ws.status.name for ws in dask_scheduler.workers.values()}


def _slot_status(dask_worker: Any) -> tuple[str, str]:
    return str(dask_worker.name), dask_worker.status.name


def test_a_node_drained_right_after_its_release_is_given_no_task() -> None:
    with cloudmap.Pool("local", nodes=2) as pool:
        pool.wait_for_nodes()
        cluster = pool._cluster
        node = pool.nodes()[0].id
        # Enough short tasks that the scheduler always has some queued for a free slot.
        futures = [pool.submit(time.sleep, 0.01) for _ in range(1500)]
        cluster.drain(node)
        for _ in range(30):
            cluster.undrain(node)
            cluster.drain(node)
            time.sleep(0.01)

        # The slot finishes what it had begun and then holds nothing: no task reached it
        # while its own report of "running" (from the release) was on its way.
        assert eventually(lambda: cluster.nodes_quiet([node]), 5), "drained node never quiet"
        time.sleep(0.3)  # any stale report still travelling would have arrived by now
        assert cluster.nodes_quiet([node])
        on_scheduler = cluster.client.run_on_scheduler(_scheduler_statuses)
        on_slots = dict(cluster.client.run(_slot_status).values())
        for name, status in on_scheduler.items():
            expected = "closing_gracefully" if node_of(name) == node else "running"
            assert status == expected == on_slots[name], (name, on_scheduler, on_slots)

        cluster.undrain(node)
        assert all(f.result(timeout=60) is None for f in futures)
        assert eventually(
            lambda: (
                set(cluster.client.run_on_scheduler(_scheduler_statuses).values()) == {"running"}
            ),
            5,
        )
