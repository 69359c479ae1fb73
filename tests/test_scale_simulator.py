"""The scale simulator (benchmarks/scale.py, short): a real pool, its real scheduler and
client, and simulated slots that speak Dask's worker protocol and run no code."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import cloudmap
from cloudmap.budget import PRIOR_TASK_COST
from cloudmap.errors import TaskError
from cloudmap.nodes import NodeState
from cloudmap.providers import register_provider
from cloudmap.testing.simulated_provider import SimulatedProvider
from cloudmap.testing.simulated_slots import DeclaredWork

NODES, SLOTS_PER_NODE = 8, 16


@pytest.fixture(scope="module")
def pool() -> Iterator[cloudmap.Pool]:
    register_provider("simulated", "cloudmap.testing.simulated_provider:SimulatedProvider")
    with cloudmap.Pool("simulated", nodes=NODES, slots_per_node=SLOTS_PER_NODE) as pool:
        provider(pool).wait_registered(timeout=120)
        pool.wait_for_nodes(NODES, timeout=120)
        yield pool


def provider(pool: cloudmap.Pool) -> SimulatedProvider:
    made = pool.provider
    assert isinstance(made, SimulatedProvider)
    return made


def test_a_map_on_simulated_slots_gives_every_result_in_order_and_keeps_every_slot_busy(
    pool: cloudmap.Pool,
) -> None:
    slots = NODES * SLOTS_PER_NODE
    provider(pool).reset_activity()
    items = range(slots * 20)  # two seconds of work per slot
    results = pool.map(DeclaredWork(0.1), items, progress=False)
    assert list(results) == list(items)
    activity = provider(pool).activity()
    assert all(first is not None for first in activity.first_starts), "a slot got no work"
    busy = sum(stop - start for start, stop in activity.intervals)
    assert busy == pytest.approx(len(items) * 0.1, rel=0.05)
    # The pool measures what a task costs its scheduler's loop (once a second, with its
    # work counts; here once more at once, the map being shorter than that).
    pool._cluster.work_counts()
    assert pool._cluster.budget.task_cost != PRIOR_TASK_COST


def test_the_pool_lists_simulated_nodes_as_any_other(pool: cloudmap.Pool) -> None:
    nodes = pool.nodes()
    assert len(nodes) == NODES
    assert {n.state for n in nodes} <= {NodeState.IDLE, NodeState.RUNNING}
    assert all(len(n.workers) == SLOTS_PER_NODE for n in nodes)


def test_simulated_slots_refuse_real_code_with_a_clear_error(pool: cloudmap.Pool) -> None:
    with pytest.raises(
        TaskError, match=r"simulated slots run only .*DeclaredWork, not builtin_function"
    ):
        pool.map(abs, [-1], progress=False)
