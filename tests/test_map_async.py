"""pool.map_async / run_async on a real local pool: the handle returns at once, results
arrive while the caller is free, cancel frees the slots, and await works in an event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import cloudmap
from cloudmap.widgets.progress_widget import ProgressWidget


def slow_double(x: int) -> int:
    time.sleep(0.02)
    return 2 * x


def fails_on_7(x: int) -> int:
    time.sleep(0.01)
    if x == 7:
        raise ValueError("seven")
    return x


def draw(x: int, rng: Any) -> float:
    return float(rng.random()) + x


@pytest.fixture(scope="module")
def pool() -> Iterator[cloudmap.Pool]:
    with cloudmap.Pool(nodes=2, slots_per_node=1) as pool:
        pool.wait_for_nodes()
        yield pool


def wait_until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_map_async_returns_at_once_and_gives_maps_results(pool: cloudmap.Pool) -> None:
    began = time.monotonic()
    run = pool.map_async(slow_double, range(200), progress=False)
    assert time.monotonic() - began < 1.0  # 200 items of 20 ms on 2 slots is 2 s of work
    assert not run.done()
    with pytest.raises(concurrent.futures.TimeoutError):
        run.result(timeout=0.05)
    wait_until(lambda: 0 < len(run.results_so_far()) < 200)
    partial = run.results_so_far()
    assert all(value == 2 * index for index, value in partial.items())
    results = run.result(timeout=60)
    assert results == [2 * x for x in range(200)]
    assert run.done() and not run.cancelled() and run.exception() is None
    assert run.completed == 200
    assert results.record is run.record is not None
    assert run.record.status == "finished" and run.record.items == 200


def test_seeded_map_async_equals_blocking_map(pool: cloudmap.Pool) -> None:
    run = pool.map_async(draw, range(300), seed=5, progress=False)
    assert run.result(timeout=60) == pool.map(draw, range(300), seed=5, progress=False)


def test_cancel_stops_the_run_keeps_what_arrived_and_frees_the_slots(
    pool: cloudmap.Pool,
) -> None:
    run = pool.map_async(slow_double, range(100_000), progress=False)
    wait_until(lambda: len(run.results_so_far()) > 0)
    assert run.cancel() is True
    assert run.done() and run.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        run.result()
    kept = run.results_so_far()
    assert kept and all(value == 2 * index for index, value in kept.items())
    assert run.record is not None and run.record.status == "cancelled"
    assert run.cancel() is False  # already ended
    # Nothing of the cancelled run is left queued: the next map has every slot.
    wait_until(lambda: pool.task_counts().queued == 0 and pool.task_counts().running == 0)
    began = time.monotonic()
    assert pool.map(slow_double, range(20), progress=False) == [2 * x for x in range(20)]
    assert time.monotonic() - began < 10


def test_a_new_run_that_cancels_the_previous_one_as_a_slider_does(pool: cloudmap.Pool) -> None:
    runs = []
    for seed in range(3):  # three slider moves in a row: only the last run finishes
        if runs:
            runs[-1].cancel()
        runs.append(pool.map_async(draw, range(2000), seed=seed, progress=False))
    assert [run.cancelled() for run in runs[:-1]] == [True, True]
    assert runs[-1].result(timeout=60) == pool.map(draw, range(2000), seed=2, progress=False)


def test_a_failure_is_raised_by_result_with_what_finished(pool: cloudmap.Pool) -> None:
    run = pool.map_async(fails_on_7, range(40), batch_size=1, progress=False)
    with pytest.raises(cloudmap.TaskError) as caught:
        run.result(timeout=60)
    assert caught.value.index == 7
    assert isinstance(run.exception(), cloudmap.TaskError)
    assert caught.value.results and 7 not in caught.value.results
    assert all(caught.value.results[i] == i for i in caught.value.results)
    assert run.record is not None and run.record.status == "failed"
    assert "seven" in run.record.error


def test_skipped_and_returned_failures_as_map_gives_them(pool: cloudmap.Pool) -> None:
    skipped = pool.map_async(fails_on_7, range(10), on_error="skip", progress=False)
    assert skipped.result(timeout=60) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    returned = pool.map_async(fails_on_7, range(10), on_error="return", progress=False)
    values = returned.result(timeout=60)
    assert isinstance(values[7], cloudmap.TaskError) and values[8] == 8


def test_bad_input_raises_at_the_call_before_any_work(pool: cloudmap.Pool) -> None:
    with pytest.raises(cloudmap.InputError, match="seed"):
        pool.map_async(draw, range(10), seed=-1)
    with pytest.raises(cloudmap.InputError, match="rng"):
        pool.map_async(slow_double, range(10), seed=1)
    with pytest.raises(cloudmap.InputError, match="not iterable"):
        pool.map_async(slow_double, 5)  # type: ignore[arg-type]


def test_await_in_an_event_loop_and_done_callbacks(pool: cloudmap.Pool) -> None:
    seen: list[cloudmap.MapRun] = []
    outcome: dict[str, Any] = {}

    async def notebook_cell() -> list[Any]:
        run = pool.map_async(slow_double, range(30), progress=False)
        run.add_done_callback(seen.append)
        ticks = 0
        while not run.done():  # the loop stays free while the run goes on
            ticks += 1
            await asyncio.sleep(0.01)
        outcome["ticks"] = ticks
        return await run

    # A kernel's loop runs in its own thread here: the test session's main thread may
    # already hold a running loop (the browser tests').
    thread = threading.Thread(target=lambda: outcome.update(result=asyncio.run(notebook_cell())))
    thread.start()
    thread.join(60)
    assert outcome["result"] == [2 * x for x in range(30)]
    assert outcome["ticks"] > 0
    assert len(seen) == 1 and seen[0].done()


def test_the_progress_widget_of_a_run_can_be_placed_by_the_caller(pool: cloudmap.Pool) -> None:
    widget = ProgressWidget(display=False)
    run = pool.map_async(slow_double, range(50), progress=widget)
    assert run.progress is widget
    run.result(timeout=60)
    assert "50" in widget.summary.value
    bundle = run._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_run_async_runs_a_command_per_item(pool: cloudmap.Pool) -> None:
    run = pool.run_async("echo {item}", ["a", "b", "c"], progress=False)
    results = run.result(timeout=60)
    assert [r.stdout.strip() for r in results] == ["a", "b", "c"]
    assert run.record is not None and run.record.kind == "run"
    assert run.record.function == "echo {item}"


def test_a_runs_output_goes_under_the_cell_that_started_it_in_a_kernel() -> None:
    """In a real Jupyter kernel, what a background run's items print is sent with the parent
    header of the cell that called map_async, even while a later cell runs."""
    from jupyter_client.manager import start_new_kernel

    manager, kernel = start_new_kernel(kernel_name="python3")
    try:
        setup = kernel.execute(
            "import time, cloudmap\n"
            "pool = cloudmap.Pool(nodes=1)\n"
            "def talk(x):\n"
            "    time.sleep(0.3)\n"
            "    print('said', x)\n"
            "    return x\n"
        )
        starts = kernel.execute("run = pool.map_async(talk, range(4), progress=False)")
        later = kernel.execute("run.result(timeout=60); time.sleep(1); pool.close()")
        said: dict[str, list[str]] = {}
        deadline = time.monotonic() + 120
        finished = set()
        while later not in finished:
            assert time.monotonic() < deadline, said
            message = kernel.get_iopub_msg(timeout=60)
            parent = message["parent_header"].get("msg_id", "")
            if message["msg_type"] == "stream" and "said" in message["content"]["text"]:
                said.setdefault(parent, []).append(message["content"]["text"])
            if message["msg_type"] == "error":
                raise AssertionError(message["content"])
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                finished.add(parent)
        assert setup in finished and list(said) == [starts], said
        assert "".join(said[starts]).count("said") == 4
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)


def test_map_async_with_a_cache_hands_out_cached_results_too(
    pool: cloudmap.Pool, tmp_path: Any
) -> None:
    cache = str(tmp_path / "cache")
    first = pool.map_async(draw, range(50), seed=3, cache=cache, progress=False).result(60)
    again = pool.map_async(draw, range(50), seed=3, cache=cache, progress=False)
    assert again.result(timeout=60) == first
    assert again.results_so_far() == dict(enumerate(first))
