"""The run record on a real local pool: what it holds, its JSON, and a rerun from it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cloudmap
from cloudmap.record import RunRecord


def draw(x: int, rng: Any) -> float:
    return float(rng.random()) + x


def fails_on_3(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


@pytest.fixture(scope="module")
def pool() -> Iterator[cloudmap.Pool]:
    prices = cloudmap.NodePrices(dedicated=0.5, spot=0.1)
    with cloudmap.Pool(nodes=2, slots_per_node=1, prices=prices) as pool:
        pool.wait_for_nodes()
        yield pool


def test_a_map_result_carries_its_record(pool: cloudmap.Pool) -> None:
    results = pool.map(draw, range(100), seed=7, retries=1, progress=False)
    record = results.record
    assert record is not None and pool.last_run() is record
    assert record.kind == "map" and record.function.endswith("draw")
    assert record.seed == 7 and record.items == 100 and record.status == "finished"
    assert record.options["retries"] == 1
    assert len(record.code_hash) >= 32
    assert record.seconds > 0
    assert record.provider == "local" and record.pool_plan
    assert set(record.node_versions) == {"node-0", "node-1"}
    for found in record.node_versions.values():
        assert found == record.client_versions  # local nodes run the client's packages
    assert record.scaling and record.scaling[0]["dedicated"] == 2
    assert record.cost is not None and record.cost > 0 and record.currency == "USD"
    # The same function hashes the same; another one does not.
    assert pool.map(draw, range(3), seed=1, progress=False).record.code_hash == record.code_hash
    other = pool.map(fails_on_3, range(3), on_error="skip", progress=False).record
    assert other.code_hash != record.code_hash


def test_a_saved_record_reruns_bit_identically_on_another_pool_size(
    pool: cloudmap.Pool, tmp_path: Path
) -> None:
    results = pool.map(draw, range(200), seed=11, progress=False)
    path = results.record.save(str(tmp_path / "study.json"))
    data = json.loads(Path(path).read_text())
    assert data["format"] == "cloudmap.run-record/1" and data["seed"] == 11
    loaded = RunRecord.load(path)
    assert loaded.code_hash == results.record.code_hash and loaded.rerunnable
    with cloudmap.Pool(nodes=1, slots_per_node=1) as single:
        again = cloudmap.rerun(path, single)
    assert [x.hex() for x in again] == [x.hex() for x in results]
    assert again.record.code_hash == results.record.code_hash


def test_a_generator_is_recorded_by_count_and_rerun_takes_items(pool: cloudmap.Pool) -> None:
    results = pool.map(draw, (i for i in range(20)), seed=3, progress=False)
    record = results.record
    assert record.items == -1  # unknown until consumed
    with pytest.raises(cloudmap.InputError, match="items="):
        cloudmap.rerun(record, pool)
    assert cloudmap.rerun(record, pool, items=range(20)) == results


def test_rerun_refuses_items_that_differ_from_the_recorded_ones(pool: cloudmap.Pool) -> None:
    record = pool.map(draw, [1, 2, 3], seed=3, progress=False).record
    with pytest.raises(cloudmap.InputError, match="differ"):
        cloudmap.rerun(record, pool, items=[1, 2, 4])
    assert cloudmap.rerun(record, pool, items=[1, 2, 3]) == pool.map(
        draw, [1, 2, 3], seed=3, progress=False
    )
    # The same items in another container are the same items.
    ranged = pool.map(draw, range(5), seed=3, progress=False)
    assert cloudmap.rerun(ranged.record, pool, items=[0, 1, 2, 3, 4]) == ranged


def test_a_failed_map_leaves_a_failed_record(pool: cloudmap.Pool) -> None:
    with pytest.raises(cloudmap.TaskError):
        pool.map(fails_on_3, range(10), progress=False)
    record = pool.last_run()
    assert record is not None and record.status == "failed" and "three" in record.error


def test_a_file_that_is_not_a_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(cloudmap.InputError, match="not a cloudmap run record"):
        RunRecord.load(str(path))
