"""The pool's view of its nodes (cloudmap.nodes.NodeView), against a scripted provider and
scheduler: merging, the scaler's and the gang's marks, lost slots, waits and capacity."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

import cloudmap
from cloudmap import nodes as node_module
from cloudmap.nodes import NodeState, NodeView, ProviderNode

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


class Scripted:
    """A provider and a scheduler whose answers the test sets."""

    def __init__(self) -> None:
        self.provider_nodes: list[ProviderNode] = []
        self.slots: dict[str, list[tuple[str, int]]] = {}

    def list_nodes(self) -> list[ProviderNode]:
        return list(self.provider_nodes)

    def slots_by_node(self) -> dict[str, list[tuple[str, int]]]:
        return dict(self.slots)

    def slot_count(self, max_age: float = 0.5) -> int:
        return sum(len(s) for s in self.slots.values())

    def node(self, node_id: str, state: str = "ready", slots: int = 2, **extra: object) -> None:
        self.provider_nodes.append(ProviderNode(node_id, state, True, slots, T0, **extra))  # type: ignore[arg-type]


@pytest.fixture
def scripted() -> Scripted:
    return Scripted()


def states(view: NodeView) -> dict[str, NodeState]:
    return {n.id: n.state for n in view.nodes()}


def test_merges_the_providers_word_with_the_slots_that_joined(scripted: Scripted) -> None:
    scripted.node("a")
    scripted.node("b")
    scripted.node("c", state="creating")
    scripted.slots = {"a": [("tcp://a0", 0), ("tcp://a1", 1)], "b": [("tcp://b0", 0)]}
    view = NodeView(scripted, scripted)
    infos = {n.id: n for n in view.nodes()}
    assert states(view) == {"a": "running", "b": "idle", "c": "creating"}
    assert infos["a"].busy_slots == 1 and infos["a"].workers == ("tcp://a0", "tcp://a1")
    assert infos["c"].since == T0  # not ready: the provider's own time


def test_marks_pushed_by_the_scaler_and_the_gang_show(scripted: Scripted) -> None:
    scripted.node("a")
    scripted.node("b")
    scripted.slots = {"a": [("tcp://a0", 0)], "b": [("tcp://b0", 0), ("tcp://b1", 0)]}
    view = NodeView(scripted, scripted)
    view.set_leaving({"a"})
    view.set_held({"b"})
    infos = {n.id: n for n in view.nodes()}
    assert infos["a"].state == NodeState.LEAVING
    assert (infos["b"].state, infos["b"].busy_slots) == (NodeState.RUNNING, 2)
    view.set_leaving(())
    view.set_held(())
    assert states(view) == {"a": "idle", "b": "idle"}


def test_since_is_kept_while_the_state_holds(scripted: Scripted) -> None:
    scripted.node("a")
    scripted.slots = {"a": [("tcp://a0", 0)]}
    view = NodeView(scripted, scripted)
    first = view.nodes()[0].since
    assert view.nodes()[0].since == first
    scripted.slots = {"a": [("tcp://a0", 1)]}
    assert view.nodes()[0].since >= first and view.nodes()[0].state == NodeState.RUNNING


def test_a_node_that_served_and_lost_its_slots_becomes_unusable_after_the_grace(
    scripted: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted.node("a")
    scripted.node("never", slots=1)  # never served: starting, however long
    scripted.slots = {"a": [("tcp://a0", 0)]}
    view = NodeView(scripted, scripted)
    assert states(view)["a"] == NodeState.IDLE
    scripted.slots = {}
    assert states(view) == {"a": "starting", "never": "starting"}
    monkeypatch.setattr(node_module, "SLOTS_LOST_GRACE", -1.0)
    assert states(view) == {"a": "unusable", "never": "starting"}


def test_capacity_and_slots_to_plan(scripted: Scripted) -> None:
    scripted.node("a", slots=2)
    scripted.node("b", state="start_failed", slots=2)
    scripted.node("p", state="preempted", slots=2, restoring=True)
    view = NodeView(scripted, scripted)
    assert view.capacity(None) == 2  # a, and p which comes back
    assert view.capacity(8) == 8  # autoscale's maximum
    assert view.slots_to_plan(None) == 4  # none joined yet: the slots on the way
    scripted.slots = {"a": [("tcp://a0", 0)]}
    assert view.slots_to_plan(None) == 1  # the connected ones


def test_with_no_node_coming_autoscale_or_a_clear_error(scripted: Scripted) -> None:
    scripted.node("b", state="start_failed")
    view = NodeView(scripted, scripted)
    assert view.slots_to_plan(4) is None  # autoscale will bring nodes
    with pytest.raises(cloudmap.NoNodesError, match="no usable nodes"):
        view.slots_to_plan(None)
    with pytest.raises(cloudmap.NoNodesError):
        view.slots_to_plan(1)  # autoscale's one node has failed already


def test_wait_for_counts_ready_nodes_against_the_targets(scripted: Scripted) -> None:
    scripted.node("a", slots=1)
    scripted.node("b", state="start_failed", slots=1)
    scripted.slots = {"a": [("tcp://a0", 0)]}
    view = NodeView(scripted, scripted)
    view.wait_for(None, lambda: (2, 0), timeout=1)  # b failed: one ready node is all
    with pytest.raises(
        TimeoutError, match=r"1 of 2 nodes ready after 0.1 s: a=idle, b=start_failed"
    ):
        view.wait_for(2, lambda: (2, 0), timeout=0.1)


def test_wait_for_leaves_the_slot_count_fresh_for_the_next_map(scripted: Scripted) -> None:
    asked: list[float] = []
    count = scripted.slot_count

    def slot_count(max_age: float = 0.5) -> int:
        asked.append(max_age)
        return count(max_age)

    scripted.slot_count = slot_count  # type: ignore[method-assign]
    scripted.node("a", slots=1)
    scripted.slots = {"a": [("tcp://a0", 0)]}
    NodeView(scripted, scripted).wait_for(1, lambda: (1, 0), timeout=1)
    assert asked[-1] == 0  # not a count cached while the slots were joining
