"""Node naming and the merge of provider and scheduler views."""

from __future__ import annotations

import pytest

from cloudmap.node import compat
from cloudmap.nodes import NodeState, merged_state, node_of, slot_name


def test_slot_names_round_trip() -> None:
    assert slot_name("node-3", 1) == "node-3/slot-1"
    assert node_of(slot_name("tvm-123_4", 0)) == "tvm-123_4"
    assert node_of("tcp://127.0.0.1:1234") is None


@pytest.mark.parametrize(
    ("provider_state", "joined", "busy", "expected"),
    [
        ("creating", 0, 0, NodeState.CREATING),
        ("starting", 0, 0, NodeState.STARTING),
        ("ready", 0, 0, NodeState.STARTING),
        ("ready", 2, 0, NodeState.IDLE),
        ("ready", 2, 1, NodeState.RUNNING),
        ("start_failed", 0, 0, NodeState.START_FAILED),
        ("leaving", 1, 1, NodeState.LEAVING),
        ("unusable", 0, 0, NodeState.UNUSABLE),
    ],
)
def test_merged_state(provider_state: str, joined: int, busy: int, expected: NodeState) -> None:
    assert merged_state(provider_state, joined, busy) is expected


def test_a_node_matching_the_client_has_no_objection() -> None:
    assert compat.mismatch(compat.versions()) is None


def test_a_node_names_every_version_that_differs_and_the_way_out() -> None:
    here = compat.versions()
    reason = compat.mismatch({"python": "2.7", "cloudmap": here["cloudmap"]})
    assert reason is not None
    assert f"python 2.7 (node: {here['python']})" in reason
    assert reason.count("(node: ") == 1  # the matching cloudmap is not named
    reason = compat.mismatch({"python": "2.7", "cloudmap": "9.9"})
    assert reason is not None
    assert "python 2.7" in reason and f"cloudmap 9.9 (node: {here['cloudmap']})" in reason
    assert "install=" in reason
