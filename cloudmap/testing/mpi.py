"""Conformance: MPI multi-instance runs (results, environment, failures, timeouts, gang
scheduling against maps and other runs, and a clear error without MPI)."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

import cloudmap

from . import mpi_tasks
from .capabilities import requires
from .harness import ProviderHarness


def _ranks_left(
    harness: ProviderHarness, marker: str = "cloudmap.node.mpi"
) -> list[psutil.Process]:
    """Processes of MPI runs still alive, where the test can see them ("local_nodes")."""
    return harness.node_processes(marker) if harness.can("local_nodes") else []


def _address(node: cloudmap.NodeInfo) -> str:
    """The node's address on the pool's network: where its slots listen."""
    return str(urlsplit(node.workers[0]).hostname)


@requires("mpi")
class MpiTests:
    """MPI runs with mpi4py and the MPI the nodes have (MPICH in cloudmap's own tests)."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def mpi4py_here(cls) -> None:
        """The client needs mpi4py too (it checks what it sends): skip the class without it."""
        pytest.importorskip("mpi4py", reason="install the cloudmap[mpi] extra")

    def test_two_nodes_by_two_ranks_allreduce_with_the_multi_instance_environment(
        self, harness: ProviderHarness, pool: cloudmap.Pool
    ) -> None:
        values = pool.mpi(
            mpi_tasks.allreduce_and_environment,
            10,
            nodes=2,
            ranks_per_node=2,
            coordination='touch "$CLOUDMAP_TASK_SHARED_DIR/coordinated"',
        )
        assert [v["rank"] for v in values] == [0, 1, 2, 3]
        assert all(v["size"] == 4 and v["sum"] == 46 for v in values)
        assert all(v["coordinated"] for v in values), "coordination did not run before the ranks"
        addresses = {n.id: _address(n) for n in pool.nodes()}
        for v in values:
            env = v["env"]
            run_nodes = env["CLOUDMAP_NODE_LIST"].split(",")
            assert sorted(run_nodes) == sorted(addresses)
            hosts = ",".join(addresses[node] for node in run_nodes)
            assert env["CLOUDMAP_HOST_LIST"] == env["AZ_BATCH_HOST_LIST"] == hosts
            assert env["CLOUDMAP_MASTER_NODE"] == addresses[run_nodes[0]]
            assert env["AZ_BATCH_MASTER_NODE"] == f"{addresses[run_nodes[0]]}:6000"
            master = "true" if v["rank"] < 2 else "false"
            assert env["CLOUDMAP_IS_MASTER"] == env["AZ_BATCH_IS_CURRENT_NODE_MASTER"] == master
            assert v["cwd"] == env["CLOUDMAP_TASK_SHARED_DIR"] == env["AZ_BATCH_TASK_SHARED_DIR"]
            own_node = env["CLOUDMAP_NODE_LIST"].split(",")[v["rank"] // 2]
            assert env["CLOUDMAP_NODE_ID"] == own_node, "a rank sees another node's variables"
            assert f"/{own_node}/" in v["cwd"]
        assert values[0]["cwd"] != values[2]["cwd"], "ranks of both nodes ran in one directory"
        root = pool.mpi(mpi_tasks.scaled_sum, 2, nodes=2, ranks_per_node=2, root_only=True)
        assert root == 2 * (1 + 2 + 3 + 4)

    def test_ranks_are_started_by_their_own_node_and_talk_over_tcp(
        self, harness: ProviderHarness, pool: cloudmap.Pool
    ) -> None:
        """What a launch of every rank from the primary node would fail: each rank is a
        descendant of its own node's slot through a hydra proxy, not of mpiexec, sees its
        own node's variables, and ranks of different nodes exchange halos over TCP."""
        values = pool.mpi(mpi_tasks.stencil_on_node, 26, nodes=2, ranks_per_node=2)
        run_nodes = values[0]["node_list"]
        assert len(set(run_nodes)) == 2
        for v in values:
            own = run_nodes[v["rank"] // 2]
            assert v["node_id"] == own, "a rank sees another node's variables"
            if harness.provider == "azure":
                assert v["batch_node_id"] == own, "a rank sees another node's AZ_BATCH_*"
            slot = next(i for i, line in enumerate(v["ancestors"]) if "cloudmap.node.slot" in line)
            assert f"{own}/slot-" in v["ancestors"][slot], "a rank was started by another node"
            assert "hydra_pmi_proxy" in v["ancestors"][slot - 1]
            assert not any("mpiexec" in line for line in v["ancestors"][:slot])
        # Ranks 1 and 2 are neighbours on different nodes: one connected to the other.
        ends_of_2 = {end for pair in values[2]["connections"] for end in pair}
        crossing = [pair for pair in values[1]["connections"] if set(pair) <= ends_of_2]
        assert crossing, "ranks of different nodes did not talk over TCP"
        if harness.can("local_nodes"):  # loopback: see docs/decisions/0007
            assert all(end.startswith("127.") for pair in crossing for end in pair)
        whole, total = mpi_tasks.stencil_serial(26)
        assert [x for v in values for x in v["block"]] == whole
        assert all(v["total"] == pytest.approx(total) for v in values)

    def test_a_rank_that_raises_stops_every_rank_and_is_named(
        self, harness: ProviderHarness, pool: cloudmap.Pool
    ) -> None:
        with pytest.raises(cloudmap.MpiError) as caught:
            pool.mpi(mpi_tasks.raise_on_rank, 3, nodes=2, ranks_per_node=2)
        error = caught.value
        assert error.rank == 3
        assert error.node == error.result.nodes[1]
        assert isinstance(error.exception, ValueError)
        assert "rank 3 refuses" in str(error) and "raise_on_rank" in error.remote_traceback
        assert not _ranks_left(harness)
        assert pool.map(abs, range(-3, 0)) == [3, 2, 1], "the nodes did not come back"

    def test_command_mode_returns_output_and_names_a_failing_rank(
        self, harness: ProviderHarness, pool: cloudmap.Pool
    ) -> None:
        result = pool.mpi_command('echo "rank $PMI_RANK"', nodes=2, ranks_per_node=2)
        assert result.exit_code == 0
        assert result.stdout == [f"rank {r}\n" for r in range(4)]
        found = pool.mpi_command("command -v python", nodes=1).stdout[0].strip()
        if harness.can("local_nodes"):  # the nodes run this Python
            assert found == str(Path(sys.executable).parent / "python"), "PATH misses the venv"
        failing = 'if [ "$PMI_RANK" = 2 ]; then echo "no input" >&2; exit 7; fi; sleep 10'
        with pytest.raises(cloudmap.MpiError) as caught:
            pool.mpi_command(failing, nodes=2, ranks_per_node=2)
        assert caught.value.rank == 2 and "status 7" in str(caught.value)
        assert "no input" in str(caught.value)
        unchecked = pool.mpi_command(failing, nodes=2, ranks_per_node=2, check=False)
        assert unchecked.exit_code == 7 and unchecked.stderr[2].strip() == "no input"

    def test_a_timeout_kills_every_rank_and_returns_the_nodes(
        self, harness: ProviderHarness, pool: cloudmap.Pool
    ) -> None:
        started = time.monotonic()
        with pytest.raises(cloudmap.MpiTimeoutError):
            pool.mpi_command(
                "sleep 60  # cloudmap-timeout-test", nodes=2, ranks_per_node=2, timeout=1
            )
        assert time.monotonic() - started < 20
        assert not _ranks_left(harness, "cloudmap-timeout-test"), "ranks outlived their timeout"
        with pytest.raises(cloudmap.MpiTimeoutError):
            pool.mpi(mpi_tasks.window, 60, nodes=1, timeout=1)
        assert not _ranks_left(harness)
        assert pool.mpi(mpi_tasks.scaled_sum, 1, nodes=2, root_only=True) == 3

    def test_mpi_map_runs_one_run_per_parameter(self, pool: cloudmap.Pool) -> None:
        counts = []

        class Recorder:
            def start(self, c: cloudmap.ProgressCounts, description: str) -> None:
                counts.append(c.done)

            def update(self, c: cloudmap.ProgressCounts) -> None:
                counts.append(c.done)

            def close(self, c: cloudmap.ProgressCounts) -> None:
                counts.append(c.done)

        results = pool.mpi_map(
            mpi_tasks.scaled_sum,
            [1, 2, 3, 4],
            nodes_per_run=1,
            ranks_per_node=2,
            progress=Recorder(),
        )
        assert results == [3, 6, 9, 12]
        assert counts[-1] == 4 and counts == sorted(counts)

    def test_a_run_larger_than_the_pool_fails_at_once(self, pool: cloudmap.Pool) -> None:
        started = time.monotonic()
        with pytest.raises(
            cloudmap.InputError, match="needs 3 whole nodes but the pool can hold at most 2"
        ):
            pool.mpi(mpi_tasks.scaled_sum, 1, nodes=3)
        assert time.monotonic() - started < 5

    def test_bad_mpi_arguments(self, pool: cloudmap.Pool) -> None:
        with pytest.raises(cloudmap.InputError, match="ranks_per_node=0"):
            pool.mpi(mpi_tasks.scaled_sum, 1, ranks_per_node=0)
        with pytest.raises(cloudmap.InputError, match="command="):
            pool.mpi_command("")

    def test_maps_and_mpi_runs_share_the_pool_without_overlap_or_deadlock(
        self, harness: ProviderHarness
    ) -> None:
        with harness.make_pool(nodes=3) as pool:
            pool.wait_for_nodes()
            spans: list[tuple[str, float, float]] = []
            mapper = threading.Thread(
                target=lambda: spans.extend(
                    pool.map(partial(mpi_tasks.node_span, seconds=0.05), range(150), progress=False)
                )
            )
            mapper.start()
            time.sleep(0.5)
            runs: dict[int, list[tuple[float, float]]] = {}
            errors: list[BaseException] = []

            def run(number: int) -> None:
                try:
                    runs[number] = pool.mpi(mpi_tasks.window, 1.0, nodes=2, ranks_per_node=1)
                except BaseException as exc:
                    errors.append(exc)

            runners = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for runner in runners:
                runner.start()
            for runner in [*runners, mapper]:
                runner.join(timeout=120)
            assert not errors, errors
            assert len(runs) == 3 and len(spans) == 150
            held_windows = [(min(b for b, _ in r), max(e for _, e in r)) for r in runs.values()]
            # Runs of 2 nodes on a 3-node pool cannot overlap each other...
            ordered = sorted(held_windows)
            assert all(a[1] <= b[0] + 0.05 for a, b in itertools.pairwise(ordered))
            # ...and while one holds two nodes, map items only run on the third.
            for began, ended in held_windows:
                during = {node for node, b, e in spans if b < ended - 0.05 and e > began + 0.05}
                assert len(during) <= 1, (during, began, ended)

    @requires("local_nodes")  # the nodes import from the test's directory
    def test_without_the_mpi_extra_the_error_names_it(
        self, harness: ProviderHarness, tmp_path: Path
    ) -> None:
        fake = tmp_path / "hide" / "mpi4py"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('No module named mpi4py (hidden)')\n")
        with harness.make_pool(nodes=1, env={"PYTHONPATH": str(fake.parent)}) as pool:
            pool.wait_for_nodes()
            with pytest.raises(cloudmap.MpiUnavailableError, match=r"cloudmap\[mpi\]"):
                pool.mpi(lambda comm: comm.rank)
            assert pool.map(abs, [-1]) == [1]

    def test_an_autoscaling_pool_grows_for_an_mpi_run(self, harness: ProviderHarness) -> None:
        policy = cloudmap.Autoscale(max_nodes=2, idle_timeout=1, interval=0.2)
        with harness.make_pool(autoscale=policy) as pool:
            assert pool.nodes() == []
            assert pool.mpi(mpi_tasks.scaled_sum, 1, nodes=2, root_only=True) == 3
            with pytest.raises(cloudmap.InputError, match="at most 2"):
                pool.mpi(mpi_tasks.scaled_sum, 1, nodes=3)

    @requires("spot", "preempt")
    def test_a_node_preempted_under_a_run_fails_it_fast_and_leaves_nothing(
        self, harness: ProviderHarness
    ) -> None:
        with harness.make_pool(nodes=1, spot_nodes=1) as pool:
            pool.wait_for_nodes()
            spot = next(n.id for n in pool.nodes() if n.spot)
            timer = threading.Timer(1.5, harness.preempt, (pool, spot))
            timer.start()
            started = time.monotonic()
            try:
                with pytest.raises(cloudmap.MpiError, match=f"node {spot} .* was lost") as caught:
                    pool.mpi_command("sleep 60  # cloudmap-preempt-test", nodes=2, ranks_per_node=2)
            finally:
                timer.join()
            assert caught.value.node == spot
            assert time.monotonic() - started < 20
            assert not _ranks_left(harness, "cloudmap-preempt-test"), "ranks outlived their node"
            assert pool.map(abs, [-2]) == [2]

    def test_a_python_coordination_step_runs_on_every_node_and_a_failing_one_stops_the_run(
        self,
        pool: cloudmap.Pool,
    ) -> None:
        values = pool.mpi(
            mpi_tasks.allreduce_and_environment,
            0,
            nodes=2,
            ranks_per_node=1,
            coordination=mpi_tasks.mark_coordinated,
        )
        assert [v["coordinated"] for v in values] == [True, True]
        with pytest.raises(cloudmap.MpiError, match="coordination step failed") as caught:
            pool.mpi(mpi_tasks.scaled_sum, 1, nodes=2, coordination="echo broken >&2; exit 4")
        assert "broken" in str(caught.value) and caught.value.rank is None
        assert pool.mpi(mpi_tasks.scaled_sum, 1, nodes=2, root_only=True) == 3
