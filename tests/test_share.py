"""pool.share: an object goes to each node once, and tasks see the object itself.

Real local pools and a real Dask scheduler; the counts are the scheduler store's own.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import cloudmap
from cloudmap.payload import LARGE_FUNCTION_BYTES, dump_function
from cloudmap.share import NODE_FOLDER, Shared, SharedDataError, resolve

from .batch_emulator import cloudmap_uses, running_batch_emulator


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cloudmap.Pool]:
    root = tmp_path_factory.mktemp("share-pool")
    with cloudmap.Pool(nodes=2, slots_per_node=2, root=str(root)) as made:
        made.wait_for_nodes()
        yield made


class Table:
    """A plain Python object defined in a test module (pickled by reference on the nodes)."""

    def __init__(self, rows: dict[str, list[int]]) -> None:
        self.rows = rows

    def total(self, key: str) -> int:
        return sum(self.rows[key])


def test_tasks_receive_the_shared_array_itself(pool: cloudmap.Pool) -> None:
    array = np.arange(1000.0)
    big = pool.share(array)
    assert isinstance(big, Shared)
    assert big.result() is array

    seen = pool.map(lambda i: (type(big).__name__, float(big[i])), range(0, 1000, 100))
    assert seen == [("ndarray", float(i)) for i in range(0, 1000, 100)]
    # As an argument or an item too, not only in a closure.
    assert pool.submit(lambda a: float(a.sum()), big).result() == float(array.sum())
    assert pool.map(lambda pair: float(pair[0][pair[1]]), [(big, 3), (big, 7)]) == [3.0, 7.0]


def test_tasks_receive_a_plain_python_object(pool: cloudmap.Pool) -> None:
    table = Table({"a": [1, 2, 3], "b": [10, 20]})
    shared = pool.share(table)
    assert pool.map(lambda key: (type(shared).__name__, shared.total(key)), ["a", "b"]) == [
        ("Table", 6),
        ("Table", 30),
    ]
    # On the client, the handle unpickles to the object itself, not a copy.
    assert pickle.loads(pickle.dumps(shared)) is table
    assert "Table" in repr(shared) and shared.digest[:12] in repr(shared)


def test_a_thousand_item_map_moves_the_object_once_per_node(pool: cloudmap.Pool) -> None:
    array = np.random.default_rng(1).random(250_000)  # 2 MB: its size is not the point
    big = pool.share(array)

    def use(i: int) -> tuple[str, int, float]:
        return os.environ["CLOUDMAP_NODE_ID"], os.getpid(), float(big[i])

    # A hundred tasks of ten items, so that every slot of both nodes resolves the object.
    out = pool.map(use, range(1000), batch_size=10)
    assert [value for _, _, value in out] == [float(v) for v in array[:1000]]
    slots = {(node, pid) for node, pid, _ in out}
    assert len(slots) == 4, f"expected all four slots to run tasks, got {sorted(slots)}"
    assert big.transfers() == {"node-0": 1, "node-1": 1}
    for node in ("node-0", "node-1"):  # the node's copy, which its other slot read
        copy = pool.node(node).read_file(f"shared/{NODE_FOLDER}/{big.digest}", binary=True)
        assert len(copy) == big.nbytes

    # Sharing the same object again names the same copy and sends nothing more.
    again = pool.share(array)
    assert again.digest == big.digest
    pool.map(lambda i: float(again[i]), range(8))
    assert again.transfers() == {"node-0": 1, "node-1": 1}


def test_a_node_that_joins_later_fetches_it_when_a_task_needs_it(tmp_path: Path) -> None:
    with cloudmap.Pool(nodes=2, slots_per_node=1, root=str(tmp_path)) as pool:
        big = pool.share(np.arange(10_000))

        def node_of_item(i: int) -> str:
            time.sleep(0.02)
            return f"{os.environ['CLOUDMAP_NODE_ID']}:{int(big[i])}"

        pool.wait_for_nodes()
        pool.map(node_of_item, range(20), batch_size=1)
        assert big.transfers() == {"node-0": 1, "node-1": 1}

        pool.resize(3)
        pool.wait_for_nodes()
        ran_on: set[str] = set()
        for _ in range(10):  # until the new node has run a task of its own
            ran_on |= {r.split(":")[0] for r in pool.map(node_of_item, range(30), batch_size=1)}
            if "node-2" in ran_on:
                break
        assert "node-2" in ran_on
        assert big.transfers() == {"node-0": 1, "node-1": 1, "node-2": 1}


def test_an_unpicklable_object_fails_at_once_and_the_pool_goes_on(pool: cloudmap.Pool) -> None:
    with pytest.raises(cloudmap.SerializationError, match=r"pool\.share .*cannot be pickled"):
        pool.share({"lock": threading.Lock()})
    assert pool.map(lambda x: x + 1, range(3)) == [1, 2, 3]


def test_a_handle_of_another_pool_fails_its_tasks_clearly(pool: cloudmap.Pool) -> None:
    stranger: Shared[int] = Shared("f" * 32, 10, 0, pool.client)
    with pytest.raises(cloudmap.TaskError) as caught:
        pool.map(lambda i: stranger + i, [1])
    assert isinstance(caught.value.exception, SharedDataError)
    assert "call pool.share(obj) on the pool that runs the task" in str(caught.value.exception)


def test_a_handle_resolved_outside_its_pool_says_where_it_works() -> None:
    with pytest.raises(SharedDataError, match="outside the tasks of its pool"):
        resolve("e" * 32, 10)


def test_a_function_over_1_mb_warns_and_names_pool_share(pool: cloudmap.Pool) -> None:
    payload = b"x" * (LARGE_FUNCTION_BYTES + 1)
    with pytest.warns(cloudmap.LargeFunctionWarning, match=r"big = pool\.share\(obj\)") as got:
        assert pool.map(lambda i: len(payload) + i, range(2)) == [len(payload), len(payload) + 1]
    (warned,) = [w for w in got if issubclass(w.category, cloudmap.LargeFunctionWarning)]
    assert warned.filename == __file__  # points at the user's line, not cloudmap's
    assert "MB" in str(warned.message) and "every task" in str(warned.message)


def test_a_function_holding_a_handle_does_not_warn(pool: cloudmap.Pool) -> None:
    big = pool.share(b"x" * (LARGE_FUNCTION_BYTES + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cloudmap.LargeFunctionWarning)
        dump_function(lambda i: len(big) + i)
        size = len(big.result())
        assert pool.map(lambda i: len(big) + i, range(2)) == [size, size + 1]


def test_counts_end_with_the_pool(pool: cloudmap.Pool, tmp_path: Path) -> None:
    with cloudmap.Pool(nodes=1, root=str(tmp_path)) as other:
        shared = other.share([1, 2, 3])
        assert other.share(shared) is shared
        assert other.map(lambda i: shared[i], range(3)) == [1, 2, 3]
    with pytest.raises(cloudmap.PoolClosedError):
        shared.transfers()
    with pytest.raises(cloudmap.PoolClosedError):
        other.share([1])
    # A handle of another pool, shared with this one, works here.
    here = pool.share(shared)
    assert here.digest == shared.digest and here is not shared
    assert pool.map(lambda i: here[i], range(3)) == [1, 2, 3]


def test_with_the_scheduler_on_a_node_the_nodes_fetch_from_it(tmp_path: Path) -> None:
    """Azure's ``scheduler="node"`` on the Batch emulator: the store is on the scheduler's
    node, the client uploads to it through the pool's endpoint, and the nodes fetch from it
    (they never connect to the client)."""
    with (
        running_batch_emulator(tmp_path, node_start_delay=0.05, page_size=50) as emulator,
        cloudmap_uses(emulator),
        cloudmap.Pool(
            "azure", nodes=2, scheduler="node", allow_from=["127.0.0.1/32"], start_timeout=60
        ) as pool,
    ):
        pool.wait_for_nodes(2)
        big = pool.share(np.arange(1000))
        assert pool.map(lambda i: int(big[i]), range(0, 1000, 10), batch_size=5) == list(
            range(0, 1000, 10)
        )
        nodes = {node.id for node in pool.nodes()}
        counts = big.transfers()
        assert counts and set(counts) <= nodes and set(counts.values()) == {1}
