"""Conformance: elastic pools (resize, spot nodes and their preemption, autoscale) lose no work.

The chaos tests run a seeded map while spot nodes are preempted (with and without notice,
as the harness can) and slot processes are killed with SIGKILL, and compare every result
with the undisturbed values.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

import pytest

import cloudmap
from cloudmap.nodes import NodeState
from cloudmap.seeding import item_rng

from . import tasks
from .capabilities import requires
from .harness import ProviderHarness

ITEMS = 10_000
SEED = 20261126

#: A disturbance: does something to a pool (with this random generator); False if it could not.
Action = Callable[[random.Random], bool]


@functools.cache
def undisturbed(items: int, seed: int = SEED) -> tuple[float, ...]:
    """What a seeded map of ``tasks.simulate`` over ``range(items)`` must return: an item's
    value depends only on the seed and its index, so this process computes it directly."""
    return tuple(tasks.simulate(i, item_rng(seed, i), seconds=0.0) for i in range(items))


class Chaos:
    """Disturbs a pool from a thread until stopped, with the named actions."""

    def __init__(self, actions: dict[str, Action]):
        self.actions = actions
        self.random = random.Random(SEED)
        self.done: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Chaos:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        # Every kind of disturbance first (in a random order), then random ones: a short
        # map still sees each kind at least once.
        names = list(self.actions)
        first = self.random.sample(names, len(names))
        while not self._stop.wait(self.random.uniform(0.2, 0.5)):
            name = first.pop(0) if first else self.random.choice(names)
            if self.actions[name](self.random):
                self.done.append(name)


class Counts:
    """A progress reporter that keeps the last counts of a map."""

    def __init__(self) -> None:
        self.last: cloudmap.ProgressCounts | None = None

    def start(self, counts: cloudmap.ProgressCounts, description: str) -> None:
        self.last = counts

    def update(self, counts: cloudmap.ProgressCounts) -> None:
        self.last = counts

    def close(self, counts: cloudmap.ProgressCounts) -> None:
        self.last = counts


def serving_spot_nodes(pool: cloudmap.Pool) -> list[str]:
    return [n.id for n in pool.nodes() if n.spot and n.state in (NodeState.IDLE, NodeState.RUNNING)]


def preemptions(harness: ProviderHarness, pool: cloudmap.Pool) -> dict[str, Action]:
    """Two kinds of preemption of a serving spot node: at once, and after a notice where the
    harness can give one (else at once again, so that preemptions keep their share of the
    chaos next to other disturbances on every provider)."""

    def preempting(notice: float | None) -> Action:
        def act(rng: random.Random) -> bool:
            candidates = serving_spot_nodes(pool)
            if not candidates:
                return False
            harness.preempt(pool, rng.choice(candidates), notice=notice)
            return True

        return act

    if harness.can("preempt_notice"):
        return {"preempt": preempting(None), "preempt_with_notice": preempting(0.3)}
    return {"preempt": preempting(None), "preempt_again": preempting(None)}


class ElasticTests:
    """Spot nodes, preemption, eviction, resizing and autoscale: each with its own pool."""

    @pytest.fixture
    def spot_pool(self, harness: ProviderHarness) -> Iterator[cloudmap.Pool]:
        """One dedicated and three spot nodes; preempted nodes come back after half a second.
        Tests using it require "spot" and "restore"."""
        with (
            harness.restoring(0.5) as restore,
            harness.make_pool(nodes=1, spot_nodes=3, **restore) as pool,
        ):
            pool.wait_for_nodes()
            yield pool

    @requires("spot", "restore", "preempt")
    def test_preemptions_lose_no_work_and_spend_no_retries(
        self, harness: ProviderHarness, spot_pool: cloudmap.Pool
    ) -> None:
        progress = Counts()
        with Chaos(preemptions(harness, spot_pool)) as chaos:
            results = spot_pool.map(
                tasks.simulate, range(ITEMS), seed=SEED, retries=0, progress=progress
            )
        assert chaos.done, "no node was preempted during the map; the test proved nothing"
        assert progress.last is not None and progress.last.requeued > 0, "no task was requeued"
        assert progress.last.retried == 0 and progress.last.failed == 0
        assert len(results) == ITEMS
        assert tuple(results) == undisturbed(ITEMS)

    @requires("spot", "restore", "preempt", "kill_slot")
    def test_killed_slots_and_preemptions_together_lose_no_work(
        self, harness: ProviderHarness, spot_pool: cloudmap.Pool
    ) -> None:
        actions = preemptions(harness, spot_pool)
        actions["kill_slot"] = partial(harness.kill_slot, spot_pool)
        with Chaos(actions) as chaos:
            # A slot killed from outside looks like a crash of the item it ran: retries cover it.
            results = spot_pool.map(
                tasks.simulate, range(ITEMS), seed=SEED, retries=3, progress=False
            )
        assert "kill_slot" in chaos.done and len(chaos.done) >= 3, chaos.done
        assert tuple(results) == undisturbed(ITEMS)

    @requires("spot", "restore", "preempt")
    def test_a_job_that_crashes_until_retries_run_out_reports_failures_and_keeps_the_rest(
        self, harness: ProviderHarness, spot_pool: cloudmap.Pool
    ) -> None:
        with Chaos({"preempt": preemptions(harness, spot_pool)["preempt"]}):
            results = spot_pool.map(
                tasks.flaky, range(ITEMS), retries=2, on_error="return", progress=False
            )
        failed = {i: r for i, r in enumerate(results) if isinstance(r, cloudmap.TaskError)}
        assert sorted(failed) == [7, 99, 4242]
        for index in (7, 4242):
            assert isinstance(failed[index].exception, ValueError)
            assert f"item {index} is bad" in str(failed[index])
            assert failed[index].attempts == 3
        assert isinstance(failed[99].exception, cloudmap.WorkerLostError)
        assert failed[99].attempts == 3
        assert [r for i, r in enumerate(results) if i not in failed] == [
            i for i in range(ITEMS) if i not in failed
        ]

    @requires("spot", "restore")
    def test_with_on_error_raise_the_error_carries_every_finished_result(
        self,
        spot_pool: cloudmap.Pool,
    ) -> None:
        with pytest.raises(cloudmap.TaskError) as caught:
            spot_pool.map(tasks.flaky, range(2000), retries=1, progress=False)
        error = caught.value
        assert error.index in (7, 99)
        assert error.attempts == 2 and error.preemptions == 0
        assert error.results, "finished results were thrown away"
        assert all(error.results[i] == i for i in error.results)
        assert 7 not in error.results and 99 not in error.results

    @requires("spot", "restore", "evict")
    def test_random_evictions_with_notice_lose_nothing(self, harness: ProviderHarness) -> None:
        eviction = cloudmap.Eviction(rate_per_node_hour=3 * 3600, notice=0.2, seed=3)
        with (
            harness.restoring(0.3) as restore,
            harness.make_pool(
                nodes=1, spot_nodes=2, **harness.evicting(eviction), **restore
            ) as pool,
        ):
            pool.wait_for_nodes(1)
            results = pool.map(
                partial(tasks.simulate, seconds=0.002), range(3000), seed=SEED, progress=False
            )
            evicted = harness.preemptions(pool)
        assert evicted, "the eviction process preempted nothing"
        assert tuple(results) == undisturbed(3000)

    @requires("spot", "restore", "preempt")
    def test_preempted_node_shows_preempted_then_comes_back(self, harness: ProviderHarness) -> None:
        # The node stays preempted for three of the scaler's one-second samples, so that the
        # history shows it even when a loaded machine delays a sample.
        with (
            harness.restoring(3.0) as restore,
            harness.make_pool(nodes=1, spot_nodes=1, **restore) as pool,
        ):
            pool.wait_for_nodes()
            spot = next(n.id for n in pool.nodes() if n.spot)
            harness.preempt(pool, spot)
            deadline = time.monotonic() + 5
            while (state := {n.id: n for n in pool.nodes()}[spot]).state != NodeState.PREEMPTED:
                assert time.monotonic() < deadline, f"{spot} never showed preempted"
                time.sleep(0.05)
            # A provider may say that it will bring the node back, or come back unannounced.
            assert state.restoring or not harness.can("restoring_state")
            pool.wait_for_nodes(2, timeout=60)
            assert {n.id: n.state for n in pool.nodes()}[spot] in (
                NodeState.IDLE,
                NodeState.RUNNING,
            )
            states = {s for sample in pool.scaling_history() for s in sample.states}
            assert "preempted" in states or len(pool.scaling_history()) < 2

    @pytest.mark.parametrize("deallocation", ["requeue", "taskcompletion"])
    def test_shrinking_a_busy_pool_loses_no_task(
        self, harness: ProviderHarness, deallocation: str
    ) -> None:
        with harness.make_pool(nodes=2) as pool:
            pool.wait_for_nodes()
            futures = [pool.submit(tasks.sleep_then, i, 1.5) for i in range(2)]
            deadline = time.monotonic() + 30
            while not all(f.running() for f in futures):
                assert time.monotonic() < deadline, "the tasks never started"
                time.sleep(0.02)
            pool.resize(nodes=1, deallocation=deallocation)
            states = {n.state for n in pool.nodes()}
            if deallocation == "taskcompletion":
                assert NodeState.LEAVING in states, states
            assert [f.result(timeout=60) for f in futures] == [0, 1]
            # requeue: the removed node's task ran again elsewhere, free; taskcompletion: the
            # leaving node was left to finish it.
            expected_requeues = 1 if deallocation == "requeue" else 0
            assert sum(f.preemptions for f in futures) == expected_requeues
            deadline = time.monotonic() + 30
            while len(pool.nodes()) != 1:
                assert time.monotonic() < deadline, pool.nodes()
                time.sleep(0.05)

    def test_autoscale_from_zero_to_max_and_back_to_the_minimum(
        self, harness: ProviderHarness
    ) -> None:
        policy = cloudmap.Autoscale(min_nodes=0, max_nodes=3, idle_timeout=1.0, interval=0.2)
        with harness.make_pool(autoscale=policy) as pool:
            assert pool.nodes() == []
            results = pool.map(partial(tasks.simulate, seconds=0.003), range(2000), seed=SEED)
            assert len(results) == 2000
            deadline = time.monotonic() + 60
            while pool.nodes():
                assert time.monotonic() < deadline, f"did not scale down: {pool.nodes()}"
                time.sleep(0.1)
            history = pool.scaling_history()
        usable = [s.states.get("idle", 0) + s.states.get("running", 0) for s in history]
        assert max(usable) == 3, usable
        assert max(s.target_dedicated for s in history) == 3
        assert history[-1].target_dedicated == 0 and history[-1].target_spot == 0
        ups = [
            i
            for i in range(1, len(history))
            if history[i].target_dedicated > history[i - 1].target_dedicated
        ]
        downs = [
            i
            for i in range(1, len(history))
            if history[i].target_dedicated < history[i - 1].target_dedicated
        ]
        assert ups and downs and max(ups) < min(downs), "the pool flapped"

    def test_autoscale_can_be_changed_and_turned_off_on_a_live_pool(
        self, harness: ProviderHarness
    ) -> None:
        with harness.make_pool(nodes=1) as pool:
            policy = pool.autoscale(min_nodes=2, max_nodes=2, interval=0.2)
            assert policy == cloudmap.Autoscale(min_nodes=2, max_nodes=2, interval=0.2)
            pool.wait_for_nodes(2, timeout=60)
            with pytest.raises(cloudmap.InputError, match="autoscale"):
                pool.resize(nodes=1)
            assert pool.autoscale(None) is None
            pool.resize(nodes=1)
            assert pool.targets == (1, 0)

    def test_history_is_bounded(
        self, harness: ProviderHarness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from cloudmap import scaling

        monkeypatch.setattr(scaling, "HISTORY_LENGTH", 5)
        with harness.make_pool(nodes=1) as pool:
            for _ in range(12):
                pool._scaling().tick()
            history = pool.scaling_history()
        assert len(history) == 5
        assert [s.time for s in history] == sorted(s.time for s in history)

    def test_a_map_on_an_autoscaling_pool_whose_nodes_all_fail_raises(
        self, harness: ProviderHarness
    ) -> None:
        policy = cloudmap.Autoscale(max_nodes=1, interval=0.2)
        with harness.make_pool(autoscale=policy, start_task="exit 3") as pool:
            started = time.monotonic()
            with pytest.raises(cloudmap.NoNodesError):
                pool.map(tasks.square, range(10), progress=False)
            assert time.monotonic() - started < 60
            assert [n.state for n in pool.nodes()] == [NodeState.START_FAILED]

    def test_a_task_queued_on_a_busy_slot_moves_to_a_node_that_joins(
        self, harness: ProviderHarness
    ) -> None:
        with harness.make_pool(nodes=1) as pool:
            pool.wait_for_nodes()
            futures = [pool.submit(tasks.sleep_span, i, 5.0) for i in range(2)]
            pool.resize(nodes=2)
            (_, first_ended), (second_began, _) = (f.result(timeout=60) for f in futures)
            assert second_began < first_ended - 1.0, (
                "the second task waited for the first instead of moving to the new node"
            )
