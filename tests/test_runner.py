"""What a slot does with a batch, run here without Dask (pure logic of the runner)."""

from __future__ import annotations

import threading
import time
from typing import Any

from cloudmap import RemoteException
from cloudmap.node.runner import run_batch
from cloudmap.payload import (
    CALL_ARGS,
    CALL_ONE,
    CALL_STAR,
    Batch,
    dump_batch,
    dump_function,
    item_bytes,
    load_result,
)
from cloudmap.seeding import item_rng


def run(
    fn: Any,
    items: Any,
    call: int = CALL_ONE,
    seed: int | None = None,
    budget: float | None = None,
) -> Any:
    batch = Batch(call, seed, None, range(10, 10 + len(items)), items, budget)
    return load_result(run_batch(dump_function(fn), dump_batch(batch)))


def test_values_in_order() -> None:
    result = run(abs, [-1, -2, 3])
    assert result.values == [1, 2, 3]
    assert result.errors == {}
    assert result.completed == 3


CALLS: list[int] = []


def record_and_fail_on_two(x: int) -> int:
    CALLS.append(x)
    if x == 2:
        raise KeyError(x)
    return x


def test_a_failing_item_keeps_its_neighbours_and_no_item_runs_twice() -> None:
    CALLS.clear()
    result = run(record_and_fail_on_two, [1, 2, 3])
    assert result.values[0] == 1 and result.values[2] == 3
    assert list(result.errors) == [1]
    assert isinstance(result.errors[1].exception(), KeyError)
    assert "KeyError" in result.errors[1].traceback
    assert CALLS == [1, 2, 3]


def test_star_and_args_calls() -> None:
    assert run(pow, [(2, 3), (3, 2)], call=CALL_STAR).values == [8, 9]
    assert run(divmod, [((7,), {"__y": 1})], call=CALL_ARGS).errors  # bad kwarg is an error
    assert run(int, [(("ff",), {"base": 16})], call=CALL_ARGS).values == [255]


def test_seeded_items_get_their_own_generator_by_index() -> None:
    result = run(lambda x, rng: rng.random(), [0, 0], seed=5)
    assert result.values == [item_rng(5, 10).random(), item_rng(5, 11).random()]


def test_unpicklable_result_becomes_that_items_error() -> None:
    result = run(lambda x: threading.Lock() if x == 1 else x, [0, 1, 2])
    assert result.values[0] == 0 and result.values[2] == 2
    assert "could not be pickled" in str(result.errors[1].exception())


def test_unpicklable_exception_is_sent_as_text() -> None:
    class Local(Exception):
        def __reduce__(self) -> Any:
            raise TypeError("no")

    def fn(x: int) -> int:
        raise Local("custom failure")

    error = run(fn, [1]).errors[0]
    rebuilt = error.exception()
    assert isinstance(rebuilt, RemoteException)
    assert "custom failure" in str(rebuilt)


def test_a_range_of_items_is_run_as_it_is() -> None:
    assert run(abs, range(-3, 0)).values == [3, 2, 1]


def slow_identity(x: int) -> int:
    CALLS.append(x)
    time.sleep(0.02)
    return x


def test_a_budget_stops_starting_items_and_says_how_many_completed() -> None:
    CALLS.clear()
    result = run(slow_identity, list(range(50)), budget=0.1)
    assert 2 <= result.completed < 20
    assert result.values[: result.completed] == list(range(result.completed))
    assert list(range(result.completed)) == CALLS  # none started past the budget


def test_a_spent_budget_still_runs_one_item() -> None:
    result = run(abs, [-1, -2], budget=0.0)
    assert result.completed == 1
    assert result.values[0] == 1


def test_tiny_items_within_their_budget_all_run() -> None:
    result = run(abs, range(-100_000, 0), budget=5.0)
    assert result.completed == 100_000
    assert result.values == list(range(100_000, 0, -1))


def test_under_a_budget_a_failing_item_keeps_its_neighbours() -> None:
    CALLS.clear()
    result = run(record_and_fail_on_two, [1, 2, 3, 4], budget=5.0)
    assert result.completed == 4
    assert list(result.errors) == [1]
    assert [result.values[i] for i in (0, 2, 3)] == [1, 3, 4]
    assert CALLS == [1, 2, 3, 4]


def test_under_a_budget_the_careful_loop_stops_too() -> None:
    CALLS.clear()
    result = run(lambda x, rng: slow_identity(x), list(range(50)), seed=1, budget=0.1)
    assert 2 <= result.completed < 20
    assert list(range(result.completed)) == CALLS


def test_item_bytes_is_the_size_of_one_item_pickled() -> None:
    assert item_bytes(1) < 20
    assert 1_000_000 < item_bytes(b"x" * 1_000_000) < 1_000_100
    assert item_bytes(threading.Lock()) == 1  # unpicklable: the batch's pickling will say so
