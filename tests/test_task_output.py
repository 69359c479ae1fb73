"""Output in the cell: what items print, log and warn shows under the map, rate-limited.

The pool tests run a real local pool (node processes, Dask scheduler and slots) and look at
what this process prints (pytest's capsys) or what a progress reporter is handed; the slot
logs are read through ``pool.node(...).read_file``. The rate limiter, the printer and the
slot's capture are also tested as plain logic.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import cloudmap
from cloudmap.node.runner import ITEM_OUTPUT_CHARS, run_batch
from cloudmap.payload import CALL_ONE, Batch, dump_batch, dump_function, load_result
from cloudmap.progress import ProgressCounts
from cloudmap.task_output import MAP_LIMIT, TaskOutput, TokenBucket, log_location

# -- functions the items run ------------------------------------------------------------------


def talk(x: int) -> int:
    print(f"hello {x}")
    if x == 2:
        print(f"grumble {x}", file=sys.stderr)
        logging.getLogger("talker").warning("careful with %s", x)
        warnings.warn(f"odd item {x}", stacklevel=1)
    return x


def quiet_here(marker: str) -> str:
    print(marker, flush=True)  # capture off: the slot's log is a file, flushed here
    return marker


def chatty(x: int) -> int:
    for line in range(5000):
        print(f"chatty {x} line {line}")
    return x


def long_item(x: int) -> int:
    print(f"begun {x}")
    time.sleep(1.5)
    return x


def fail_on_two(x: int) -> int:
    print(f"working on {x}")
    if x == 2:
        logging.getLogger("failer").error("about to fail on %s", x)
        raise ValueError(f"bad item {x}")
    return x


def overrun(x: int) -> int:
    print(f"stuck on {x}")
    time.sleep(30)
    return x


class Recorder:
    """A progress reporter that takes the items' lines, with the time each arrived."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str, str]] = []

    def start(self, counts: ProgressCounts, description: str) -> None:
        pass

    def update(self, counts: ProgressCounts) -> None:
        pass

    def close(self, counts: ProgressCounts) -> None:
        pass

    def write_output(self, text: str, stream: str) -> None:
        now = time.monotonic()
        self.lines.extend((now, stream, line) for line in text.splitlines())


@pytest.fixture(scope="module")
def pool() -> Iterator[cloudmap.Pool]:
    with cloudmap.Pool(nodes=2, slots_per_node=1) as pool:
        yield pool


def slot_logs(pool: cloudmap.Pool) -> str:
    return "".join(pool.node(node.id).read_file("slots/slot-0.log") for node in pool.nodes())


# -- on a real pool -----------------------------------------------------------------------------


def test_prints_logs_and_warnings_show_with_item_and_node(
    pool: cloudmap.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pool.map(talk, range(4), progress=False) == [0, 1, 2, 3]
    out, err = capsys.readouterr()
    for x in range(4):
        assert re.search(rf"^\[item {x} node-\d\] hello {x}$", out, re.M), out
    assert re.search(r"^\[item 2 node-\d\] grumble 2$", err, re.M), err
    assert re.search(r"^\[item 2 node-\d\] WARNING:talker:careful with 2$", err, re.M), err
    assert re.search(r"^\[item 2 node-\d\] .*UserWarning: odd item 2$", err, re.M), err
    assert "grumble" not in out and "hello" not in err  # stderr lines go to stderr


def kept_events(dask_scheduler: Any) -> dict[str, int | None]:
    topics = dask_scheduler._broker._topics
    return {name: topics[name].events.maxlen for name in ("cloudmap-output", "cloudmap-started")}


def test_the_scheduler_keeps_few_of_cloudmaps_own_events(pool: cloudmap.Pool) -> None:
    """Output lines and start events reach the client as they happen; the scheduler keeps
    only the last thousand of each (Dask keeps 100,000), so a long map does not pile them up."""
    pool.map(talk, range(4), progress=False)
    assert pool.client.run_on_scheduler(kept_events) == {
        "cloudmap-output": 1000,
        "cloudmap-started": 1000,
    }


def test_capture_output_false_shows_nothing_and_the_slot_log_keeps_it(
    pool: cloudmap.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = f"unseen-{time.time_ns()}"
    pool.map(quiet_here, [marker], progress=False, capture_output=False)
    out, err = capsys.readouterr()
    assert marker not in out + err
    assert marker in slot_logs(pool)


def test_a_chatty_function_is_rate_limited_and_its_log_has_everything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A pool of its own: the map spends its slots' rate limit, which the other tests need.
    with cloudmap.Pool(nodes=1, slots_per_node=2) as pool:
        started = time.monotonic()
        pool.map(chatty, range(2), progress=False)
        elapsed = time.monotonic() - started
        logs = pool.node("node-0").read_file("slots/slot-0.log")
        logs += pool.node("node-0").read_file("slots/slot-1.log")
    out, err = capsys.readouterr()
    shown = [line for line in out.splitlines() if line.startswith("[item")]
    burst, rate = MAP_LIMIT
    assert 0 < len(shown) <= burst + rate * elapsed + 1
    summaries = [line for line in err.splitlines() if "lines of output were not shown" in line]
    assert len(summaries) == 1, err
    not_shown = int(re.search(r"\] ([\d,]+) lines", summaries[0])[1].replace(",", ""))  # type: ignore[index]
    assert not_shown == 10_000 - len(shown)
    assert "pool.node('node-0').read_file('slots/slot-" in summaries[0]
    for x in range(2):
        assert all(f"chatty {x} line {n}\n" in logs for n in (0, 2500, 4999))


def test_a_long_items_line_arrives_while_it_runs(pool: cloudmap.Pool) -> None:
    recorder = Recorder()
    pool.map(long_item, [7], progress=recorder)
    ended = time.monotonic()
    begun = [(at, stream, line) for at, stream, line in recorder.lines if "begun 7" in line]
    assert len(begun) == 1 and begun[0][1] == "stdout"
    assert re.fullmatch(r"\[item 0 node-\d\] begun 7", begun[0][2])
    assert ended - begun[0][0] > 0.8, "the line should arrive while the item sleeps"


def test_a_failing_items_error_carries_its_own_output(pool: cloudmap.Pool) -> None:
    with pytest.raises(cloudmap.TaskError) as caught:
        pool.map(fail_on_two, range(4), batch_size=4, progress=False)
    error = caught.value
    assert error.index == 2
    assert error.output == "working on 2\nERROR:failer:about to fail on 2\n"
    assert "The item's output (.output):\nworking on 2" in str(error)
    results = pool.map(fail_on_two, range(4), on_error="return", progress=False)
    assert isinstance(results[2], cloudmap.TaskError) and "working on 2" in results[2].output


def test_an_item_that_overruns_its_timeout_keeps_its_output(
    pool: cloudmap.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(cloudmap.TaskError) as caught:
        pool.map(overrun, [5], timeout=1.0, progress=False)
    assert isinstance(caught.value.exception, cloudmap.TaskTimeoutError)
    assert caught.value.output == "stuck on 5\n"
    out, _ = capsys.readouterr()
    assert re.search(r"^\[item 0 node-\d\] stuck on 5$", out, re.M), out


def test_the_progress_widget_shows_lines_and_each_failures_output(pool: cloudmap.Pool) -> None:
    from cloudmap.widgets import ProgressWidget

    progress = ProgressWidget(display=False)
    pool.map(fail_on_two, range(4), on_error="return", progress=progress)
    assert progress.output is not None and progress.output in progress.widget.children
    texts = "".join(part["text"] for part in progress.output.outputs)
    assert re.search(r"\[item 3 node-\d\] working on 3", texts)
    assert progress.failure_list is not None
    html = progress.failure_list.value
    assert "cloudmap-failure-output" in html and "about to fail on 2" in html
    assert "read_file(&#x27;slots/slot-0.log&#x27;)" in html
    pool.map(abs, range(3), progress=progress)  # reused: the last run's lines go
    assert progress.output is None and progress.widget.children == (progress.summary,)


# -- plain logic ----------------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_its_rate() -> None:
    bucket = TokenBucket(3, 2.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.25) is False  # half a token
    assert bucket.take(0.5) is True  # one token after 0.5 s at 2/s
    assert bucket.take(100.0) and bucket.take(100.0) and bucket.take(100.0)
    assert not bucket.take(100.0)  # refilled to the burst, no further
    assert not bucket.take(99.0)  # a clock going back gives nothing


def test_the_printer_limits_a_map_and_sums_up_where_the_rest_is() -> None:
    written: list[tuple[str, str]] = []
    output = TaskOutput(limit=(2, 1.0))
    output.open(lambda text, stream: written.append((stream, text)))
    try:
        lines = [[10, 0, "a"], [11, 1, "b"], [12, 0, "c"]]
        message = {"tag": output.tag, "slot": "node-1/slot-0", "lines": lines, "dropped": 4}
        output.receive(message, now=0.0)
        assert output.waiting and (output.dropped_here, output.dropped_on_slots) == (1, 4)
        output.show()
        assert written[0] == ("stdout", "[item 10 node-1] a\n")
        stream, text = written[1]  # runs of one stream are written together
        assert stream == "stderr" and text.startswith("[item 11 node-1] b\n[cloudmap] ")
        assert "rate-limited" in text and len(written) == 2 and output.shown == 2
        later = {"tag": output.tag, "slot": "node-2/slot-1", "lines": [[13, 0, "d"]]}
        output.receive(later, now=1.5)
        output.show()
        assert written[2] == ("stdout", "[item 13 node-2] d\n")
    finally:
        output.close()
    summary = written[-1][1]
    assert "5 lines of output were not shown" in summary
    assert log_location("node-1/slot-0") in summary
    assert log_location("node-1/slot-0") == "pool.node('node-1').read_file('slots/slot-0.log')"


def test_the_slot_attributes_lines_by_position_and_restores_its_streams() -> None:
    def fn(x: int) -> int:
        print(f"line of {x}", end="" if x == 1 else "\n")
        if x >= 1:
            raise KeyError(x)
        return x

    before = sys.stdout, sys.stderr
    batch = Batch(CALL_ONE, None, None, range(20, 23), [0, 1, 2], output="tag")
    result = load_result(run_batch(dump_function(fn), dump_batch(batch)))
    assert (sys.stdout, sys.stderr) == before
    assert result.values[0] == 0
    assert result.errors[1].output == "line of 1\n"  # unterminated, still its own
    assert result.errors[2].output == "line of 2\n"
    without = Batch(CALL_ONE, None, None, range(20, 23), [0, 1, 2])
    result = load_result(run_batch(dump_function(fn), dump_batch(without)))
    assert result.errors[2].output == ""


def test_a_failing_items_output_is_bounded_to_its_last_lines() -> None:
    def flood(x: int) -> None:
        for n in range(20_000):
            print(f"flood line {n}")
        raise RuntimeError("flooded")

    batch = Batch(CALL_ONE, 1, None, range(1), [0], output="tag")  # seeded: the careful loop
    result = load_result(run_batch(dump_function(lambda x, rng: flood(x)), dump_batch(batch)))
    output: Any = result.errors[0].output
    assert len(output) <= ITEM_OUTPUT_CHARS + 100
    assert output.endswith("flood line 19999\n") and "earlier characters" in output


def test_a_handler_the_function_adds_is_captured_once_in_every_batch() -> None:
    logger = logging.getLogger("cloudmap-test-own-handler")

    def logs_then_fails(x: int) -> None:
        if not logger.handlers:  # made during the first batch: it holds that batch's tee
            logger.addHandler(logging.StreamHandler(sys.stderr))
        logger.warning("own handler says %s", x)
        raise RuntimeError(x)

    try:
        for batch_number in range(2):
            batch = Batch(CALL_ONE, None, None, range(1), [batch_number], output="tag")
            result = load_result(run_batch(dump_function(logs_then_fails), dump_batch(batch)))
            assert result.errors[0].output == f"own handler says {batch_number}\n"
    finally:
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
