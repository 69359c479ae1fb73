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
        while not self._stop.wait(self.random.uniform(0.2, 0.5)):
            action = self.random.choice(self.actions)
            if action(self.random):
                self.done.append(action.__name__)


def serving_spot_nodes(pool: cloudmap.Pool) -> list[str]:
    return [
        n.id for n in pool.nodes() if n.spot and n.state in (NodeState.IDLE, NodeState.RUNNING)
    ]


def preempt_without_notice(pool: cloudmap.Pool, rng: random.Random) -> bool:
    candidates = serving_spot_nodes(pool)
    if not candidates:
        return False
    pool.provider.preempt(rng.choice(candidates))  # type: ignore[union-attr]
    return True


def preempt_with_notice(pool: cloudmap.Pool, rng: random.Random) -> bool:
    candidates = serving_spot_nodes(pool)
    if not candidates:
        return False
    pool.provider.preempt(rng.choice(candidates), notice=0.3)  # type: ignore[union-attr]
    return True


def kill_a_slot(pool: cloudmap.Pool, rng: random.Random) -> bool:
    slots = [
        p
        for p in psutil.Process(os.getpid()).children(recursive=True)
        if "cloudmap.node.slot" in " ".join(_cmdline(p))
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
    with cloudmap.Pool(provider, nodes=1, spot_nodes=3, restore_after=0.5) as pool:
        pool.wait_for_nodes()
        yield pool


def test_preemptions_lose_no_work_and_spend_no_retries(
    spot_pool: cloudmap.Pool, expected: list[float]
) -> None:
    actions = [partial(preempt_without_notice, spot_pool), partial(preempt_with_notice, spot_pool)]
    for action, name in zip(actions, ("preempt_without_notice", "preempt_with_notice"), strict=True):
        action.__name__ = name  # type: ignore[attr-defined]
    with Chaos(spot_pool, actions) as chaos:  # type: ignore[arg-type]
        results = spot_pool.map(tasks.simulate, range(ITEMS), seed=SEED, retries=0, progress=False)
        time.sleep(0)  # the chaos ran during the whole map
    assert chaos.done, "no node was preempted during the map; the test proved nothing"
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
