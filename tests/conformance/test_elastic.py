"""Elastic pools: resize, spot nodes and their preemption, autoscale; and no work lost.

The chaos tests run a seeded map while nodes are preempted (with and without notice) and
slot processes are killed with SIGKILL, and compare every result with an undisturbed run.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

import psutil
import pytest

import cloudmap
from cloudmap.nodes import NodeState

from . import tasks
from .conftest import local_only, preempt, restoring

ITEMS = 10_000
SEED = 20261126


@pytest.fixture(scope="module")
def expected() -> list[float]:
    """The undisturbed run: the same map on a small quiet pool."""
    with cloudmap.Pool(nodes=2) as quiet:
        return quiet.map(tasks.simulate, range(ITEMS), seed=SEED, progress=False)


class Chaos:
    """Disturbs a pool from a thread until stopped: preempts spot nodes, kills slots."""

    def __init__(self, pool: cloudmap.Pool, actions: list[Callable[[random.Random], bool]]):
        self.pool = pool
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
        first = self.random.sample(self.actions, len(self.actions))
        while not self._stop.wait(self.random.uniform(0.2, 0.5)):
            action = first.pop(0) if first else self.random.choice(self.actions)
            if action(self.random):
                self.done.append(action.__name__)


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


def preempt_without_notice(pool: cloudmap.Pool, rng: random.Random) -> bool:
    candidates = serving_spot_nodes(pool)
    if not candidates:
        return False
    preempt(pool, rng.choice(candidates))
    return True


def preempt_with_notice(pool: cloudmap.Pool, rng: random.Random) -> bool:
    candidates = serving_spot_nodes(pool)
    if not candidates:
        return False
    preempt(pool, rng.choice(candidates), notice=0.3)
    return True


def kill_a_slot(pool: cloudmap.Pool, rng: random.Random) -> bool:
    # A slot's command line names its scheduler. (Batch nodes' agents outlive the start
    # task that began them, so they are not this process's descendants.)
    slots = [
        p
        for p in psutil.process_iter()
        if "cloudmap.node.slot" in (line := " ".join(_cmdline(p)))
        and pool.scheduler_address in line
    ]
    if not slots:
        return False
    try:
        os.kill(rng.choice(slots).pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


@pytest.fixture
def spot_pool(provider: str) -> Iterator[cloudmap.Pool]:
    """One dedicated and three spot nodes; preempted nodes come back after half a second."""
    with cloudmap.Pool(provider, nodes=1, spot_nodes=3, **restoring(provider, 0.5)) as pool:
        pool.wait_for_nodes()
        yield pool


def test_preemptions_lose_no_work_and_spend_no_retries(
    spot_pool: cloudmap.Pool, expected: list[float]
) -> None:
    actions = [partial(preempt_without_notice, spot_pool), partial(preempt_with_notice, spot_pool)]
    for action, name in zip(
        actions, ("preempt_without_notice", "preempt_with_notice"), strict=True
    ):
        action.__name__ = name  # type: ignore[attr-defined]
    progress = Counts()
    with Chaos(spot_pool, actions) as chaos:  # type: ignore[arg-type]
        results = spot_pool.map(
            tasks.simulate, range(ITEMS), seed=SEED, retries=0, progress=progress
        )
    assert chaos.done, "no node was preempted during the map; the test proved nothing"
    assert progress.last is not None and progress.last.requeued > 0, "no task was requeued"
    assert progress.last.retried == 0 and progress.last.failed == 0
    assert len(results) == ITEMS
    assert results == expected


def test_killed_slots_and_preemptions_together_lose_no_work(
    spot_pool: cloudmap.Pool, expected: list[float]
) -> None:
    actions = [
        partial(preempt_without_notice, spot_pool),
        partial(preempt_with_notice, spot_pool),
        partial(kill_a_slot, spot_pool),
    ]
    for action, name in zip(actions, ("preempt", "preempt_with_notice", "kill_slot"), strict=True):
        action.__name__ = name  # type: ignore[attr-defined]
    with Chaos(spot_pool, actions) as chaos:  # type: ignore[arg-type]
        # A slot killed from outside looks like a crash of the item it ran: retries cover it.
        results = spot_pool.map(tasks.simulate, range(ITEMS), seed=SEED, retries=3, progress=False)
    assert "kill_slot" in chaos.done and len(chaos.done) >= 3, chaos.done
    assert results == expected


def test_a_job_that_crashes_until_retries_run_out_reports_failures_and_keeps_the_rest(
    spot_pool: cloudmap.Pool,
) -> None:
    actions = [partial(preempt_without_notice, spot_pool)]
    actions[0].__name__ = "preempt"  # type: ignore[attr-defined]
    with Chaos(spot_pool, actions):  # type: ignore[arg-type]
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


def test_with_on_error_raise_the_error_carries_every_finished_result(
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


def test_random_evictions_with_notice_lose_nothing(provider: str) -> None:
    local_only(provider, "cloudmap.Eviction preempts local spot nodes at random")
    eviction = cloudmap.Eviction(rate_per_node_hour=3 * 3600, notice=0.2, seed=3)
    with cloudmap.Pool(
        provider, nodes=1, spot_nodes=2, eviction=eviction, restore_after=0.3
    ) as pool:
        pool.wait_for_nodes(1)
        results = pool.map(
            partial(tasks.simulate, seconds=0.002), range(3000), seed=SEED, progress=False
        )
        preemptions = list(pool.provider.preemptions)  # type: ignore[union-attr]
    assert preemptions, "the eviction process preempted nothing"
    with cloudmap.Pool(provider, nodes=1) as quiet:
        assert results == quiet.map(
            partial(tasks.simulate, seconds=0.0), range(3000), seed=SEED, progress=False
        )


def test_preempted_node_shows_preempted_then_comes_back(provider: str) -> None:
    with cloudmap.Pool(provider, nodes=1, spot_nodes=1, **restoring(provider, 1.0)) as pool:
        pool.wait_for_nodes()
        spot = next(n.id for n in pool.nodes() if n.spot)
        preempt(pool, spot)
        deadline = time.monotonic() + 5
        while (state := {n.id: n for n in pool.nodes()}[spot]).state != NodeState.PREEMPTED:
            assert time.monotonic() < deadline, f"{spot} never showed preempted"
            time.sleep(0.05)
        # The local provider says it will bring the node back; Batch does not say.
        assert state.restoring or provider == "azure"
        pool.wait_for_nodes(2, timeout=60)
        assert {n.id: n.state for n in pool.nodes()}[spot] in (NodeState.IDLE, NodeState.RUNNING)
        states = {s for sample in pool.scaling_history() for s in sample.states}
        assert "preempted" in states or len(pool.scaling_history()) < 2


@pytest.mark.parametrize("deallocation", ["requeue", "taskcompletion"])
def test_shrinking_a_busy_pool_loses_no_task(provider: str, deallocation: str) -> None:
    with cloudmap.Pool(provider, nodes=2) as pool:
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


def test_autoscale_from_zero_to_max_and_back_to_the_minimum(provider: str) -> None:
    policy = cloudmap.Autoscale(min_nodes=0, max_nodes=3, idle_timeout=1.0, interval=0.2)
    with cloudmap.Pool(provider, autoscale=policy) as pool:
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


def test_autoscale_can_be_changed_and_turned_off_on_a_live_pool(provider: str) -> None:
    with cloudmap.Pool(provider, nodes=1) as pool:
        policy = pool.autoscale(min_nodes=2, max_nodes=2, interval=0.2)
        assert policy == cloudmap.Autoscale(min_nodes=2, max_nodes=2, interval=0.2)
        pool.wait_for_nodes(2, timeout=60)
        with pytest.raises(cloudmap.InputError, match="autoscale"):
            pool.resize(nodes=1)
        assert pool.autoscale(None) is None
        pool.resize(nodes=1)
        assert pool.targets == (1, 0)


def test_history_is_bounded(provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudmap import scaling

    monkeypatch.setattr(scaling, "HISTORY_LENGTH", 5)
    with cloudmap.Pool(provider, nodes=1) as pool:
        for _ in range(12):
            pool._scaling().tick()
        history = pool.scaling_history()
    assert len(history) == 5
    assert [s.time for s in history] == sorted(s.time for s in history)


def test_a_map_on_an_autoscaling_pool_whose_nodes_all_fail_raises(provider: str) -> None:
    policy = cloudmap.Autoscale(max_nodes=1, interval=0.2)
    with cloudmap.Pool(provider, autoscale=policy, start_task="exit 3") as pool:
        started = time.monotonic()
        with pytest.raises(cloudmap.NoNodesError):
            pool.map(tasks.square, range(10), progress=False)
        assert time.monotonic() - started < 60
        assert [n.state for n in pool.nodes()] == [NodeState.START_FAILED]


def test_a_task_queued_on_a_busy_slot_moves_to_a_node_that_joins(provider: str) -> None:
    with cloudmap.Pool(provider, nodes=1) as pool:
        pool.wait_for_nodes()
        futures = [pool.submit(tasks.sleep_span, i, 5.0) for i in range(2)]
        pool.resize(nodes=2)
        (_, first_ended), (second_began, _) = (f.result(timeout=60) for f in futures)
        assert second_began < first_ended - 1.0, (
            "the second task waited for the first instead of moving to the new node"
        )
