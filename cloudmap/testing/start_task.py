"""Conformance: start tasks run before a node's slots join, and a failure is shown, not hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

import cloudmap
from cloudmap.nodes import NodeState

from . import tasks
from .capabilities import requires
from .harness import ProviderHarness


def _nothing_left(harness: ProviderHarness) -> bool:
    """No node process of the harness is alive (where the test can see them, "local_nodes")."""
    return not harness.can("local_nodes") or harness.node_processes() == []


class StartTaskTests:
    """Shell and Python start tasks, and each way a node's start can fail (each test makes
    its own pool, with its own start task)."""

    def test_shell_start_task_runs_before_slots_join(self, harness: ProviderHarness) -> None:
        command = (
            'echo "from shell" > "$CLOUDMAP_NODE_SHARED_DIR/marker"; echo hello from $GREETING'
        )
        with harness.make_pool(nodes=1, start_task=command, env={"GREETING": "env"}) as pool:
            assert pool.map(tasks.read_shared, ["marker"]) == ["from shell"]
            # A provider may let the slots join while the start task still waits for them;
            # the node is idle, with its start task's record, a moment later.
            pool.wait_for_nodes()
            (node,) = pool.nodes()
            assert node.start_task is not None
            assert node.start_task.exit_code == 0
            assert node.start_task.stdout.strip() == "hello from env"

    def test_python_start_task_runs_on_every_node(self, harness: ProviderHarness) -> None:
        with harness.make_pool(nodes=2, start_task=tasks.write_shared_marker) as pool:
            pool.wait_for_nodes()
            assert pool.map(tasks.read_shared, ["python-marker"] * 4) == ["from python"] * 4
            assert all("start task ran" in n.start_task.stdout for n in pool.nodes())  # type: ignore[union-attr]

    def test_failing_start_task_raises_with_its_output_and_leaves_nothing(
        self, harness: ProviderHarness
    ) -> None:
        with pytest.raises(cloudmap.PoolStartError) as caught:
            harness.make_pool(nodes=2, start_task="echo cannot install >&2; exit 3")
        error = caught.value
        assert "cannot install" in str(error)
        assert len(error.nodes) == 2
        for node in error.nodes:
            assert node.state == "start_failed"
            assert node.start_task.exit_code == 3
            assert "cannot install" in node.start_task.stderr
        assert _nothing_left(harness)

    @requires("local_nodes")  # the nodes import from the test's directory
    def test_a_node_whose_slots_cannot_start_raises_with_their_log_and_leaves_nothing(
        self, harness: ProviderHarness, tmp_path: Path
    ) -> None:
        # A broken environment on the node: its slots (Dask workers) die on import, again and
        # again. The pool must say so at once, quoting the slot's log, not wait start_timeout.
        broken = tmp_path / "broken" / "distributed"
        broken.mkdir(parents=True)
        (broken / "__init__.py").write_text("raise ImportError('distributed is broken here')\n")
        with pytest.raises(cloudmap.PoolStartError, match="distributed is broken here") as caught:
            harness.make_pool(nodes=1, env={"PYTHONPATH": str(broken.parent)})
        assert "slot 0 failed to start" in str(caught.value)
        assert _nothing_left(harness)

    @requires("local_nodes")  # the nodes race for a lock in the test's directory
    def test_one_failed_node_is_shown_while_the_others_work(
        self, harness: ProviderHarness, tmp_path: Path
    ) -> None:
        # The first node to take the lock fails (the test's nodes share this machine's disk).
        command = f'if mkdir "{tmp_path}/lock" 2>/dev/null; then echo disk full >&2; exit 1; fi'
        with harness.make_pool(nodes=2, start_task=command) as pool:
            pool.wait_for_nodes(count=1)
            assert pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]
            failed = [n for n in pool.nodes() if n.state == NodeState.START_FAILED]
            working = [n for n in pool.nodes() if n.state in (NodeState.IDLE, NodeState.RUNNING)]
            assert len(failed) == 1 and len(working) == 1
            assert failed[0].start_task is not None
            assert "disk full" in failed[0].start_task.stderr

    def test_start_deadline_raises_and_removes_the_nodes(self, harness: ProviderHarness) -> None:
        with pytest.raises(cloudmap.PoolStartError, match="start_timeout"):
            harness.make_pool(nodes=1, start_task="sleep 60", start_timeout=1.0)
        assert _nothing_left(harness)
