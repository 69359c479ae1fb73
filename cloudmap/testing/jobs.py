"""Conformance: jobs prepare each node once before its first task and release it at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import cloudmap
from cloudmap import JobPreparationError, JobReleaseError

from . import tasks
from .capabilities import requires
from .harness import ProviderHarness


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


class JobTests:
    """Jobs with preparation and release steps, on a two-node, two-slot pool they share."""

    @pytest.fixture(scope="class")
    @classmethod
    def two_slot_pool(cls, harness: ProviderHarness) -> Iterator[cloudmap.Pool]:
        with harness.make_pool(nodes=2, slots_per_node=2) as pool:
            pool.wait_for_nodes()
            yield pool

    @requires("local_nodes")  # the steps write to the test's files
    def test_prepare_once_per_node_and_release_where_prepared(
        self, two_slot_pool: cloudmap.Pool, tmp_path: Path
    ) -> None:
        prepared, released = tmp_path / "prepared.log", tmp_path / "released.log"
        with two_slot_pool.job(
            prepare=f'echo "$CLOUDMAP_NODE_ID" >> {prepared}; sleep 0.2',
            release=f'echo "$CLOUDMAP_NODE_ID" >> {released}',
        ) as job:
            nodes = job.map(tasks.job_node, range(200), progress=False)
            again = job.run("echo $CLOUDMAP_JOB_ID", ["x"])
            assert again[0].stdout.strip() == job.id
            assert _lines(released) == [], "released before the job ended"
        assert sorted(_lines(prepared)) == sorted(set(_lines(prepared))), "prepared twice"
        assert set(_lines(prepared)) == set(nodes)
        assert sorted(_lines(released)) == sorted(_lines(prepared))

    @requires("local_nodes")  # the release writes to the test's file
    def test_release_runs_when_the_job_fails(
        self, two_slot_pool: cloudmap.Pool, tmp_path: Path
    ) -> None:
        released = tmp_path / "released.log"
        with (
            pytest.raises(cloudmap.TaskError),
            two_slot_pool.job(
                prepare="true", release=f'echo "$CLOUDMAP_NODE_ID" >> {released}'
            ) as job,
        ):
            job.map(tasks.fail_on, range(10), progress=False)
        assert _lines(released), "the release did not run after a failed job"

    def test_a_failed_preparation_fails_the_tasks_with_its_output(
        self,
        two_slot_pool: cloudmap.Pool,
    ) -> None:
        with two_slot_pool.job(prepare="echo no licence >&2; exit 2") as job:
            results = job.map(tasks.square, range(4), on_error="return", progress=False)
        assert all(isinstance(r, cloudmap.TaskError) for r in results)
        error = results[0].exception
        assert isinstance(error, JobPreparationError)
        assert "exited with status 2" in str(error) and "no licence" in str(error)

    def test_a_failed_release_is_reported(self, two_slot_pool: cloudmap.Pool) -> None:
        job = two_slot_pool.job(prepare="true", release="exit 5")
        job.map(tasks.square, range(4), progress=False)
        with pytest.raises(JobReleaseError, match="status 5"):
            job.close()
        with pytest.raises(cloudmap.InputError, match="has ended"):
            job.map(tasks.square, [1])

    def test_callable_steps_and_bad_steps(self, two_slot_pool: cloudmap.Pool) -> None:
        with two_slot_pool.job(prepare=tasks.write_shared_marker) as job:
            assert job.map(tasks.square, [3], progress=False) == [9]
        with pytest.raises(cloudmap.InputError, match="neither a shell command nor a callable"):
            two_slot_pool.job(prepare=42)  # type: ignore[arg-type]
        with pytest.raises(cloudmap.InputError, match="does not take"):
            two_slot_pool.job().map(tasks.square, [1], chunks=3)
