"""Conformance: map, imap, submit and executor, with the semantics every provider must give."""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import distributed
import numpy as np
import pytest

import cloudmap
from cloudmap.nodes import NodeState

from . import tasks
from .capabilities import requires
from .harness import ProviderHarness


class RecordingReporter:
    """A progress reporter that keeps what the engine told it."""

    def __init__(self) -> None:
        self.started: cloudmap.ProgressCounts | None = None
        self.updates: list[int] = []
        self.closed: cloudmap.ProgressCounts | None = None

    def start(self, counts: cloudmap.ProgressCounts, description: str) -> None:
        self.started = counts
        self.description = description

    def update(self, counts: cloudmap.ProgressCounts) -> None:
        self.updates.append(counts.done)

    def close(self, counts: cloudmap.ProgressCounts) -> None:
        self.closed = counts


class MapTests:
    """map, imap, submit and the executor on the shared two-node pool."""

    def test_map_returns_results_in_input_order(self, pool: cloudmap.Pool) -> None:
        assert pool.map(tasks.square, range(2000)) == [x * x for x in range(2000)]

    def test_map_over_several_iterables_zips_them(self, pool: cloudmap.Pool) -> None:
        assert pool.map(tasks.add, [1, 2, 3], (10, 20, 30)) == [11, 22, 33]

    def test_map_of_empty_input_is_empty(self, pool: cloudmap.Pool) -> None:
        assert pool.map(tasks.square, []) == []

    @requires("local_nodes")  # the nodes append to the test's file
    def test_every_item_is_called_once_even_when_items_are_equal(
        self, pool: cloudmap.Pool, tmp_path: Path
    ) -> None:
        log = tmp_path / "calls.log"
        from functools import partial

        results = pool.map(partial(tasks.log_call, log=str(log)), [7] * 500)
        assert results == [7] * 500
        assert log.read_text().splitlines() == ["7"] * 500

    def test_seeded_results_do_not_depend_on_batching_or_node_count(
        self, harness: ProviderHarness, pool: cloudmap.Pool
    ) -> None:
        expected = [
            float(np.random.default_rng(np.random.SeedSequence(11).spawn(300)[i]).random() + i)
            for i in range(300)
        ]
        assert pool.map(tasks.draw, range(300), seed=11) == expected
        assert pool.map(tasks.draw, range(300), seed=11, batch_size=1) == expected
        assert pool.map(tasks.draw, range(300), seed=11, batch_size=37) == expected
        assert list(pool.imap(tasks.draw, range(300), seed=11, ordered=False)) != []
        assert sorted(pool.imap(tasks.draw, range(300), seed=11, ordered=False)) == sorted(expected)
        with harness.make_pool(nodes=1) as single:
            assert single.map(tasks.draw, range(300), seed=11, batch_size=5) == expected
        assert pool.map(tasks.draw, range(300), seed=12) != expected

    def test_on_error_raise_carries_index_node_attempts_traceback_and_results(
        self,
        pool: cloudmap.Pool,
    ) -> None:
        with pytest.raises(cloudmap.TaskError) as caught:
            pool.map(tasks.fail_on, range(10), batch_size=2)
        error = caught.value
        assert error.index == 3
        assert error.item == 3
        assert error.attempts == 1
        assert isinstance(error.exception, ValueError)
        assert "bad item 3" in error.remote_traceback
        assert error.node in {node.id for node in pool.nodes()}
        assert error.worker is not None and error.worker.startswith(error.node)
        assert {i: error.results[i] for i in (0, 1, 2)} == {0: 0, 1: 1, 2: 2}
        assert 3 not in error.results

    def test_on_error_return_puts_the_error_in_place(self, pool: cloudmap.Pool) -> None:
        results = pool.map(tasks.fail_on, range(6), on_error="return")
        assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
        assert isinstance(results[3], cloudmap.TaskError)

    def test_on_error_skip_leaves_failed_items_out(self, pool: cloudmap.Pool) -> None:
        assert pool.map(tasks.fail_on, range(6), on_error="skip") == [0, 1, 2, 4, 5]
        assert list(pool.imap(tasks.fail_on, range(6), on_error="skip")) == [0, 1, 2, 4, 5]

    @requires("local_nodes")  # the nodes mark tried items in the test's directory
    def test_retries_rerun_failed_items_and_count_attempts(
        self, pool: cloudmap.Pool, tmp_path: Path
    ) -> None:
        from functools import partial

        fn = partial(tasks.fail_once, directory=str(tmp_path / "a"))
        (tmp_path / "a").mkdir()
        assert pool.map(fn, range(20), retries=1) == list(range(20))

        (tmp_path / "b").mkdir()
        fn = partial(tasks.fail_once, directory=str(tmp_path / "b"))
        results = pool.map(fn, range(4), retries=0, on_error="return")
        assert results[0] == 0 and results[2] == 2
        assert isinstance(results[1], cloudmap.TaskError) and results[1].attempts == 1

    def test_imap_streams_an_endless_generator_with_bounded_reads(
        self, pool: cloudmap.Pool
    ) -> None:
        pulled = itertools.count()

        def endless() -> Iterator[int]:
            for n in itertools.count():
                next(pulled)
                yield n

        from functools import partial

        results = pool.imap(partial(tasks.sleep_then, seconds=0.001), endless())
        first = list(itertools.islice(results, 300))
        results.close()  # type: ignore[attr-defined]
        assert first == list(range(300))
        # Ordered: at most 2 windows of batches are open (finished or in flight), and items
        # of at least 1 ms make batches of at most 500 (half a second): bounded reads.
        assert next(pulled) < 300 + 2 * (2 * 2 + 2) * 500

    def test_imap_unordered_yields_every_result_once(self, pool: cloudmap.Pool) -> None:
        results = list(pool.imap(tasks.square, range(1000), ordered=False))
        assert sorted(results) == [x * x for x in range(1000)]

    def test_submit_returns_a_concurrent_futures_future(self, pool: cloudmap.Pool) -> None:
        future = pool.submit(tasks.add, 2, y=40)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=30) == 42
        futures = [pool.submit(tasks.square, x) for x in range(10)]
        done, _ = concurrent.futures.wait(futures, timeout=30)
        assert len(done) == 10
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == [
            x * x for x in range(10)
        ]

    def test_submit_failure_is_a_task_error(self, pool: cloudmap.Pool) -> None:
        future = pool.submit(tasks.fail_on, 3)
        with pytest.raises(cloudmap.TaskError) as caught:
            future.result(timeout=30)
        assert isinstance(caught.value.exception, ValueError)
        assert isinstance(future.exception(), cloudmap.TaskError)

    def test_submitted_future_can_be_cancelled(self, pool: cloudmap.Pool) -> None:
        blockers = [pool.submit(tasks.sleep_then, i, 0.5) for i in range(2)]
        queued = pool.submit(tasks.sleep_then, 99, 0.5)
        assert queued.cancel()
        assert queued.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result()
        assert [b.result(timeout=30) for b in blockers] == [0, 1]

    def test_executor_is_a_concurrent_futures_executor(self, pool: cloudmap.Pool) -> None:
        with pool.executor() as executor:
            assert isinstance(executor, concurrent.futures.Executor)
            assert list(executor.map(tasks.square, range(50))) == [x * x for x in range(50)]
            assert executor.submit(tasks.add, 1, 2).result(timeout=30) == 3
        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(tasks.square, 1)
        assert not pool.closed

    def test_dask_is_available_directly(self, pool: cloudmap.Pool) -> None:
        # Dask pickles an importable function by reference; a lambda travels by value, so this
        # works on nodes that do not have the tests' files (nodes of a remote provider).
        assert pool.client.submit(lambda x: x * x, 9).result(timeout=30) == 81
        with distributed.Client(pool) as client:  # a TLS pool's certificates come along
            assert client.submit(lambda x: x * x, 5).result(timeout=30) == 25

    def test_nodes_report_id_state_kind_slots_and_since(self, pool: cloudmap.Pool) -> None:
        nodes = pool.nodes()
        assert len({n.id for n in nodes}) == 2
        for node in nodes:
            assert node.state in (NodeState.IDLE, NodeState.RUNNING)
            assert node.dedicated is True
            assert node.slots == 1
            assert node.since.tzinfo is not None
            assert len(node.workers) == 1
        assert "2 nodes" in repr(pool)

    def test_slots_see_the_node_directories(self, pool: cloudmap.Pool) -> None:
        env = pool.map(tasks.node_environment, [0])[0]
        root = Path(env["CLOUDMAP_NODE_ROOT_DIR"])
        assert env["CLOUDMAP_NODE_ID"] in {node.id for node in pool.nodes()}
        for name in ("SHARED", "STARTUP", "TASKS"):
            assert Path(env[f"CLOUDMAP_NODE_{name}_DIR"]).parent == root

    def test_progress_hook_sees_every_item_and_failure(self, pool: cloudmap.Pool) -> None:
        reporter = RecordingReporter()
        pool.map(tasks.fail_on, range(500), on_error="skip", progress=reporter)
        assert reporter.started is not None and reporter.started.total == 500
        assert reporter.description == "map"
        assert reporter.updates == sorted(reporter.updates)
        assert reporter.closed is not None
        assert (reporter.closed.done, reporter.closed.failed) == (499, 1)

    def test_progress_true_draws_a_text_bar(
        self, pool: cloudmap.Pool, capsys: pytest.CaptureFixture[str]
    ) -> None:
        pool.map(tasks.square, range(100), progress=True)
        assert "100/100" in capsys.readouterr().err

    def test_no_progress_when_false(
        self, pool: cloudmap.Pool, capsys: pytest.CaptureFixture[str]
    ) -> None:
        pool.map(tasks.square, range(100), progress=False)
        assert capsys.readouterr().err == ""

    def test_submitted_future_reports_running(self, pool: cloudmap.Pool) -> None:
        future = pool.submit(tasks.sleep_then, 1, 1.0)
        deadline = time.monotonic() + 30
        while not future.running() and not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.running()
        assert future.result(timeout=30) == 1
        assert not future.running()
