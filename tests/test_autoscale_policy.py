"""The autoscale policy, with plain numbers: one evaluation at a time, then short simulations."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from itertools import pairwise

import pytest

from cloudmap.autoscale import Autoscale, KindCounts, ScalingDecision, ScalingInputs, decide
from cloudmap.errors import InputError

NOW = 1000.0


def kind(
    usable: int = 0, idle: tuple[float, ...] = (), preempted: int = 0, failed: int = 0
) -> KindCounts:
    return KindCounts(usable=usable, idle_for=idle, preempted=preempted, failed=failed)


def snapshot(
    queued: int = 0,
    running: int = 0,
    *,
    slots: int = 1,
    dedicated: KindCounts | None = None,
    spot: KindCounts | None = None,
    up_ago: float | None = None,
) -> ScalingInputs:
    """Inputs at NOW; ``up_ago`` is how many seconds ago the last scale-up was (None: never)."""
    return ScalingInputs(
        now=NOW,
        queued_tasks=queued,
        running_tasks=running,
        slots_per_node=slots,
        dedicated=dedicated or kind(),
        spot=spot or kind(),
        last_scale_up=None if up_ago is None else NOW - up_ago,
    )


def targets(decision: ScalingDecision) -> tuple[int, int, int]:
    return decision.dedicated, decision.spot, decision.usable


LONG = (600.0,)  # an idle time far above any idle_timeout used here


@pytest.mark.parametrize(
    ("settings", "inputs", "expected", "reason"),
    [
        # Scale up from nothing at once, by at most `step` usable nodes.
        ({"step": 8}, snapshot(5), (5, 0, 5), "scale up: 5 tasks for 0 nodes, target 5"),
        ({}, snapshot(37), (4, 0, 4), "scale up: 37 tasks for 0 nodes, target 4"),
        ({}, snapshot(33, 4, dedicated=kind(4)), (8, 0, 8), "scale up"),
        # Scale-up is immediate even right after the previous one.
        ({"max_nodes": 16}, snapshot(20, 4, dedicated=kind(4), up_ago=1), (8, 0, 8), "scale up"),
        # Never above max_nodes.
        ({"step": 8}, snapshot(94, 6, dedicated=kind(6)), (8, 0, 8), "scale up"),
        ({}, snapshot(92, 8, dedicated=kind(8)), (8, 0, 8), "hold: 8 nodes for 100 tasks"),
        # min_nodes: reached with no work (bounded by step), kept when idle.
        ({"min_nodes": 2}, snapshot(), (2, 0, 2), "scale up: min_nodes=2, 0 nodes, target 2"),
        ({"min_nodes": 6, "step": 4}, snapshot(), (4, 0, 4), "scale up: min_nodes=6"),
        ({"min_nodes": 2}, snapshot(dedicated=kind(2, LONG * 2)), (2, 0, 2), "hold"),
        ({"min_nodes": 2}, snapshot(dedicated=kind(5, LONG * 5)), (2, 0, 2), "scale down"),
        # Slots: a node takes `slots_per_node` tasks, and a partial node counts as one.
        ({"step": 8}, snapshot(9, slots=4), (3, 0, 3), "scale up"),
        ({"step": 8}, snapshot(8, slots=4), (2, 0, 2), "scale up"),
        ({"step": 8}, snapshot(0, 1, slots=4), (1, 0, 1), "scale up"),
        ({}, snapshot(3, 4, slots=4, dedicated=kind(2)), (2, 0, 2), "hold"),
        ({}, snapshot(3, 6, slots=4, dedicated=kind(2)), (3, 0, 3), "scale up"),
        # Scale down: only nodes idle for idle_timeout, at most `step` of them.
        ({}, snapshot(0, 1, dedicated=kind(4, (59.9,) * 3)), (4, 0, 4), "hold: 3 nodes spare"),
        ({}, snapshot(0, 1, dedicated=kind(4, (60.0,) * 3)), (1, 0, 1), "scale down"),
        ({}, snapshot(0, 1, dedicated=kind(4, (100, 10, 10))), (3, 0, 3), "scale down: 1 node"),
        ({}, snapshot(dedicated=kind(8, LONG * 8)), (4, 0, 4), "scale down: 4 nodes idle"),
        ({"step": 1}, snapshot(dedicated=kind(3, LONG * 3)), (2, 0, 2), "scale down"),
        ({"idle_timeout": 0}, snapshot(dedicated=kind(2, (0.0, 0.0))), (0, 0, 0), "scale down"),
        # ...and never within idle_timeout of the last scale-up.
        (
            {},
            snapshot(dedicated=kind(4, LONG * 4), up_ago=30),
            (4, 0, 4),
            "hold: 4 nodes spare, scaled up 30 s ago",
        ),
        ({}, snapshot(dedicated=kind(4, LONG * 4), up_ago=60), (0, 0, 0), "scale down"),
        # Spot: the first min_nodes are dedicated, the rest spot.
        (
            {"spot": True, "min_nodes": 1, "step": 8},
            snapshot(5),
            (1, 4, 5),
            "scale up",
        ),
        ({"spot": True, "min_nodes": 2, "step": 1}, snapshot(5), (1, 0, 1), "scale up"),
        ({"spot": True, "step": 8}, snapshot(5), (0, 5, 5), "scale up"),
        (
            {"spot": True, "min_nodes": 1},
            snapshot(dedicated=kind(1, LONG), spot=kind(3, LONG * 3)),
            (1, 0, 1),
            "scale down: 3 nodes",
        ),
        # An idle dedicated node of the minimum is not removed in place of a spot node.
        (
            {"spot": True, "min_nodes": 1},
            snapshot(0, 2, dedicated=kind(1, LONG), spot=kind(3, LONG)),
            (1, 2, 3),
            "scale down: 1 node",
        ),
        (
            {"spot": True, "min_nodes": 1},
            snapshot(0, 2, dedicated=kind(1, LONG), spot=kind(2)),
            (1, 2, 3),
            "hold: 1 node spare, none idle 60 s yet",
        ),
        # Dedicated nodes above the minimum (from an earlier setting) go first when idle.
        (
            {"spot": True, "min_nodes": 1, "step": 1},
            snapshot(0, 1, dedicated=kind(3, LONG * 3), spot=kind(1, LONG)),
            (2, 1, 3),
            "scale down",
        ),
        # spot=False: new capacity is dedicated; existing spot nodes are kept while needed...
        ({}, snapshot(4, 2, spot=kind(2)), (4, 2, 6), "scale up"),
        ({}, snapshot(0, 2, spot=kind(2)), (0, 2, 2), "hold"),
        # ...and are the first to go once idle.
        ({"step": 2}, snapshot(dedicated=kind(2, LONG * 2), spot=kind(2, LONG * 2)), (2, 0, 2), ""),
        ({}, snapshot(0, 2, dedicated=kind(2, LONG * 2), spot=kind(2)), (0, 2, 2), "scale down"),
        # Preempted spot nodes count toward the service's size: the target includes them,
        # so lost capacity is replaced.
        (
            {"spot": True, "step": 8},
            snapshot(2, 2, spot=kind(2, preempted=2)),
            (0, 6, 4),
            "scale up: 4 tasks for 2 nodes, target 4",
        ),
        ({"spot": True}, snapshot(0, 4, spot=kind(4, preempted=1)), (0, 5, 4), "hold"),
        # Failed nodes take room under max_nodes: a broken start task cannot grow the pool.
        (
            {"step": 8},
            snapshot(100, dedicated=kind(0, failed=3)),
            (8, 0, 5),
            "scale up: 100 tasks for 0 nodes, target 5 (3 failed nodes within max_nodes=8)",
        ),
        ({}, snapshot(100, dedicated=kind(0, failed=8)), (8, 0, 0), "hold: 0 nodes"),
        ({}, snapshot(100, dedicated=kind(0, failed=12)), (12, 0, 0), "hold"),
        (
            {"spot": True, "max_nodes": 4},
            snapshot(10, spot=kind(0, failed=2)),
            (0, 4, 2),
            "scale up",
        ),
        # ...and cap min_nodes too, but nodes already there are not removed below min_nodes.
        ({"min_nodes": 4}, snapshot(dedicated=kind(0, failed=6)), (8, 0, 2), "scale up"),
        (
            {"min_nodes": 4},
            snapshot(dedicated=kind(4, LONG * 4, failed=6)),
            (10, 0, 4),
            "hold: 2 nodes spare, min_nodes=4",
        ),
    ],
)
def test_decide(
    settings: dict[str, object],
    inputs: ScalingInputs,
    expected: tuple[int, int, int],
    reason: str,
) -> None:
    decision = decide(Autoscale(**settings), inputs)  # type: ignore[arg-type]
    assert targets(decision) == expected
    assert decision.reason.startswith(reason)


def test_decide_is_pure() -> None:
    policy = Autoscale(min_nodes=1, spot=True, idle_timeout=30)
    inputs = snapshot(
        3,
        5,
        slots=2,
        dedicated=kind(1, (50.0,), failed=1),
        spot=kind(6, (40.0, 5.0), preempted=2),
        up_ago=45,
    )
    before = copy.deepcopy((policy, inputs))
    first = decide(policy, inputs)
    assert decide(policy, inputs) == first
    assert (policy, inputs) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_nodes": -1}, "min_nodes=-1 is not valid"),
        ({"min_nodes": 1.5}, "min_nodes=1.5 is not valid"),
        ({"max_nodes": 0}, "max_nodes=0 is not valid"),
        ({"max_nodes": True}, "max_nodes=True is not valid"),
        ({"step": 0}, "step=0 is not valid"),
        ({"min_nodes": 5, "max_nodes": 2}, "min_nodes=5 is more than max_nodes=2; pass min_nodes"),
        ({"spot": "yes"}, "spot='yes' is not valid"),
        ({"spot": 1}, "spot=1 is not valid"),
        ({"idle_timeout": -1}, "idle_timeout=-1 is not valid"),
        ({"idle_timeout": "60"}, "idle_timeout='60' is not valid"),
        ({"idle_timeout": math.nan}, "idle_timeout=nan is not valid"),
        ({"interval": 0}, "interval=0 is not valid"),
        ({"interval": None}, "interval=None is not valid"),
    ],
)
def test_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(")):
        Autoscale(**settings)  # type: ignore[arg-type]


def test_settings_edges_accepted() -> None:
    assert Autoscale(min_nodes=3, max_nodes=3, idle_timeout=0, step=1, interval=0.1).max_nodes == 3
    assert Autoscale(idle_timeout=math.inf).idle_timeout == math.inf


# Simulations: decisions are fed back as the next counts, one evaluation per second.


@dataclass
class Node:
    spot: bool
    idle_since: float | None  # None while busy


def simulate(
    policy: Autoscale, demands: list[int], slots: int = 1
) -> tuple[list[ScalingDecision], list[Node]]:
    """Evaluate once per second; ``demands[t]`` is queued + running tasks at second ``t``.

    Work goes to busy nodes first, then to the most recently idle ones, so the nodes idle
    the longest stay idle: the schedule most likely to tempt the policy into flapping.
    Removal asserts that only idle nodes are asked for.
    """
    nodes: list[Node] = []
    last_up: float | None = None
    decisions: list[ScalingDecision] = []
    for second, demand in enumerate(demands):
        now = float(second)
        running = min(demand, len(nodes) * slots)
        busy = -(-running // slots)
        nodes.sort(key=lambda n: -math.inf if n.idle_since is None else -n.idle_since)
        for index, node in enumerate(nodes):
            if index < busy:
                node.idle_since = None
            elif node.idle_since is None:
                node.idle_since = now

        def counts(spot: bool, now: float = now) -> KindCounts:
            mine = [n for n in nodes if n.spot is spot]
            idle = tuple(now - n.idle_since for n in mine if n.idle_since is not None)
            return KindCounts(usable=len(mine), idle_for=idle)

        inputs = ScalingInputs(
            now, demand - running, running, slots, counts(False), counts(True), last_up
        )
        decision = decide(policy, inputs)
        decisions.append(decision)
        if decision.usable > len(nodes):
            last_up = now
        for spot, target in ((False, decision.dedicated), (True, decision.spot)):
            mine = [n for n in nodes if n.spot is spot]
            nodes.extend(Node(spot, now) for _ in range(target - len(mine)))
            idle = sorted(
                (n for n in mine if n.idle_since is not None), key=lambda n: n.idle_since or 0
            )
            for _ in range(len(mine) - target):
                assert idle, f"second {second}: a busy node would be removed ({decision})"
                nodes.remove(idle.pop(0))
    return decisions, nodes


def direction_changes(values: list[int]) -> int:
    """How many times a sequence turns from rising to falling or back."""
    steps = [b - a for a, b in pairwise(values) if b != a]
    return sum(1 for a, b in pairwise(steps) if (a > 0) != (b > 0))


@pytest.mark.parametrize(
    ("settings", "pattern", "slots"),
    [
        ({"max_nodes": 16}, [6, 10], 1),
        ({"max_nodes": 16}, [8, 5, 7, 6], 1),
        ({"max_nodes": 8}, [2, 40], 4),  # with the maximum binding at the peaks
        ({"max_nodes": 16, "spot": True, "min_nodes": 2}, [3, 12, 9], 1),
        ({"max_nodes": 16, "step": 1, "idle_timeout": 10}, [4, 9], 2),
    ],
)
def test_no_flapping_when_demand_oscillates(
    settings: dict[str, object], pattern: list[int], slots: int
) -> None:
    policy = Autoscale(**settings)  # type: ignore[arg-type]
    decisions, _ = simulate(policy, pattern * 150, slots=slots)
    for series in ([d.usable for d in decisions], [d.dedicated for d in decisions]):
        assert series == sorted(series)  # never down while the demand stays in the band
    assert [d.spot for d in decisions] == sorted(d.spot for d in decisions)


def test_a_lull_shorter_than_idle_timeout_keeps_the_nodes() -> None:
    policy = Autoscale(max_nodes=16, idle_timeout=60)
    demands = [12] * 10 + [0] * 40 + [12] * 10 + [0] * 200
    decisions, nodes = simulate(policy, demands)
    usable = [d.usable for d in decisions]
    assert usable[:4] == [4, 8, 12, 12]
    assert min(usable[3:100]) == 12  # the 40 s lull and the first 60 idle s after it
    assert direction_changes(usable) == 1  # up once, down once
    assert usable[-1] == 0 and nodes == []
    # Down in `step`-sized steps, one evaluation apart.
    downs = [a - b for a, b in pairwise(usable) if b < a]
    assert downs == [4, 4, 4]


def test_spot_simulation_keeps_dedicated_minimum() -> None:
    policy = Autoscale(min_nodes=2, max_nodes=10, spot=True, idle_timeout=5, step=3)
    decisions, nodes = simulate(policy, [20] * 10 + [0] * 60)
    assert [(d.dedicated, d.spot) for d in decisions[:4]] == [(2, 1), (2, 4), (2, 7), (2, 8)]
    assert all(d.dedicated == 2 for d in decisions)
    assert (decisions[-1].dedicated, decisions[-1].spot) == (2, 0)
    assert sorted(n.spot for n in nodes) == [False, False]
