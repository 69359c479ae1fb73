"""Conformance: timeouts, crashes, Ctrl-C and dead nodes each free what they held and leave
the pool usable (or fail the work clearly when nothing is left to run it)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import psutil
import pytest

import cloudmap
from cloudmap.nodes import SLOTS_LOST_GRACE

from . import tasks
from .capabilities import requires
from .harness import ProviderHarness
from .waiting import eventually


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie":
            return True
        time.sleep(0.05)
    return False


def _state(pool: cloudmap.Pool, node_id: str) -> cloudmap.NodeState | None:
    return next((n.state for n in pool.nodes() if n.id == node_id), None)


def _task_count(dask_scheduler: object) -> int:
    return len(dask_scheduler.tasks)  # type: ignore[attr-defined]


class FaultTests:
    """Faults inside tasks (each test kills or restarts slots, so has its own pool) and
    faults of whole nodes, caused by the harness."""

    @pytest.fixture
    def own_pool(self, harness: ProviderHarness) -> Iterator[cloudmap.Pool]:
        """A pool for one test that kills or restarts slots."""
        with harness.make_pool(nodes=2, slots_per_node=1) as pool:
            pool.wait_for_nodes()
            yield pool

    @requires("local_nodes")  # the hung item leaves its pid in the test's directory
    def test_timeout_kills_the_item_and_the_slot_comes_back(
        self, own_pool: cloudmap.Pool, tmp_path: Path
    ) -> None:
        fn = partial(tasks.hang_on, directory=str(tmp_path))
        started = time.monotonic()
        results = own_pool.map(fn, range(8), timeout=1.0, on_error="return", batch_size=4)
        assert time.monotonic() - started < 30
        assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
        error = results[3]
        assert isinstance(error, cloudmap.TaskError)
        assert isinstance(error.exception, cloudmap.TaskTimeoutError)
        assert error.attempts == 1
        assert _wait_gone(int((tmp_path / "hung.pid").read_text())), "the hung slot still runs"
        own_pool.wait_for_nodes(timeout=30)
        assert own_pool.map(tasks.square, range(100)) == [x * x for x in range(100)]

    @requires("local_nodes")  # the hung item leaves its pid in the test's directory
    def test_timeout_with_retries_tries_again_then_reports_attempts(
        self, own_pool: cloudmap.Pool, tmp_path: Path
    ) -> None:
        fn = partial(tasks.hang_on, directory=str(tmp_path), hang=0)
        with pytest.raises(cloudmap.TaskError) as caught:
            own_pool.map(fn, range(3), timeout=0.5, retries=1)
        assert caught.value.attempts == 2
        assert isinstance(caught.value.exception, cloudmap.TaskTimeoutError)

    def test_a_crashing_item_is_isolated_and_its_neighbours_survive(
        self,
        own_pool: cloudmap.Pool,
    ) -> None:
        results = own_pool.map(tasks.crash_on, range(40), batch_size=10, on_error="return")
        assert [r for i, r in enumerate(results) if i != 5] == [i for i in range(40) if i != 5]
        assert isinstance(results[5], cloudmap.TaskError)
        assert isinstance(results[5].exception, cloudmap.WorkerLostError)
        own_pool.wait_for_nodes(timeout=30)
        assert own_pool.map(tasks.square, range(10)) == [x * x for x in range(10)]

    def test_ctrl_c_cancels_the_map_frees_slots_and_keeps_the_pool(
        self,
        own_pool: cloudmap.Pool,
    ) -> None:
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                own_pool.map(partial(tasks.sleep_then, seconds=60), range(20), batch_size=1)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 10
        # The slots that ran 60-second items were restarted, so new work runs at once.
        own_pool.wait_for_nodes(timeout=30)
        started = time.monotonic()
        assert own_pool.map(tasks.square, range(10)) == [x * x for x in range(10)]
        assert time.monotonic() - started < 20

    @requires("break_node")
    def test_a_map_on_a_pool_whose_every_node_died_fails_instead_of_hanging(
        self, harness: ProviderHarness
    ) -> None:
        with harness.make_pool(nodes=1) as pool:
            (node,) = pool.nodes()
            timer = threading.Timer(1.0, harness.break_node, (pool, node.id))
            timer.start()
            started = time.monotonic()
            with pytest.raises(cloudmap.NoNodesError, match="no usable nodes"):
                fn = partial(tasks.sleep_then, seconds=60)
                pool.map(fn, range(4), batch_size=1, on_error="return")
            timer.cancel()
            assert time.monotonic() - started < 30
            assert [n.state for n in pool.nodes()] == [cloudmap.NodeState.UNUSABLE]

    @requires("kill_agent")
    def test_a_node_whose_cloudmap_died_while_its_vm_lives_is_unusable_and_skipped(
        self, harness: ProviderHarness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The provider keeps calling such a node idle: the pool must see by itself that it no
        # longer serves, or a map (or an MPI run counting on it) would wait for it forever.
        # The pool's grace (20 s) is its policy; a shorter one tests the same rule, faster.
        grace = min(SLOTS_LOST_GRACE, 5.0)
        monkeypatch.setattr(cloudmap.nodes, "SLOTS_LOST_GRACE", grace)
        within = grace + 15
        with harness.make_pool(nodes=2) as pool:
            pool.wait_for_nodes()
            first, second = (n.id for n in pool.nodes())
            harness.kill_cloudmap_on(pool, first)
            lost = eventually(lambda: _state(pool, first) == cloudmap.NodeState.UNUSABLE, within)
            assert lost, pool.nodes()
            assert pool.map(tasks.square, range(6)) == [0, 1, 4, 9, 16, 25]
            harness.kill_cloudmap_on(pool, second)
            started = time.monotonic()
            with pytest.raises(cloudmap.NoNodesError, match="no usable nodes"):
                pool.map(tasks.square, range(6))
            assert time.monotonic() - started < within
            assert {n.state for n in pool.nodes()} == {cloudmap.NodeState.UNUSABLE}

    def test_items_queued_behind_a_crash_are_never_charged_for_it(
        self, harness: ProviderHarness
    ) -> None:
        with harness.make_pool(nodes=1, slots_per_node=2) as pool:
            pool.wait_for_nodes()
            for _ in range(3):
                results = pool.map(tasks.crash_on_odd, range(8), batch_size=1, on_error="return")
                assert results[0::2] == [0, 2, 4, 6]
                assert all(isinstance(r, cloudmap.TaskError) for r in results[1::2])
                futures = [pool.submit(tasks.crash_on_odd, x) for x in range(6)]
                assert [f.result(timeout=60) for f in futures[0::2]] == [0, 2, 4]
                assert all(
                    isinstance(f.exception(), cloudmap.WorkerLostError) for f in futures[1::2]
                )

    def test_a_finished_map_leaves_no_task_on_the_pool(self, own_pool: cloudmap.Pool) -> None:
        own_pool.map(tasks.fail_on, range(50), on_error="return", batch_size=5)
        own_pool.submit(tasks.square, 3).result(timeout=30)
        own_pool.submit(tasks.fail_on, 3).exception(timeout=30)
        deadline = time.monotonic() + 10
        while own_pool.client.run_on_scheduler(_task_count) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert own_pool.client.run_on_scheduler(_task_count) == 0
