"""The widgets against a real pool, in this process (no browser): what they show, their
controls, their refresh thread, and the static fallbacks. The browser tests in
tests/browser/ check the same widgets drawn by JupyterLab, Voilà and the HTML manager."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import cloudmap
from cloudmap.progress import make_reporter
from cloudmap.widgets.display import with_fallbacks
from cloudmap.widgets.progress_widget import ProgressWidget

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def slow_square(x: int) -> int:
    time.sleep(0.02)
    if x == 13:
        raise ValueError("unlucky 13")
    return x * x


def wait_until(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def pool() -> Iterator[cloudmap.Pool]:
    with cloudmap.Pool(
        nodes=2, slots_per_node=2, prices=cloudmap.NodePrices(dedicated=0.5, spot=0.1)
    ) as pool:
        pool.wait_for_nodes()
        yield pool


def test_pool_widget_shows_nodes_targets_slots_tasks_and_cost(pool: cloudmap.Pool) -> None:
    widget = pool.widget()
    assert pool.widget() is widget  # one per pool
    wait_until(lambda: widget.snapshot is not None and widget.snapshot.states["idle"] == (2, 0))
    pool.map(slow_square, range(40), on_error="skip", progress=False)
    wait_until(lambda: widget.snapshot is not None and widget.snapshot.tasks.done > 0)
    snap = widget.snapshot
    assert snap is not None
    assert snap.target == (2, 0) and snap.current == (2, 0)
    assert snap.slots_total == 4
    assert snap.node_size == "local process, 2 slots"
    assert snap.cost_per_hour == pytest.approx(1.0)
    assert snap.spent is not None and snap.spent > 0
    assert 'data-state="idle" data-kind="dedicated">2<' in widget.table.value
    assert 'data-cost-per-hour="1.0000"' in widget.work.value
    # The chart draws the scaling history (one sample a second): 2 nodes, target 2.
    wait_until(lambda: len(widget.chart.nodes.y[0]) >= 3)
    assert list(widget.chart.nodes.y[0][-3:]) == [2, 2, 2]
    assert list(widget.chart.target.y[-3:]) == [2, 2, 2]


def test_pool_widget_keeps_refreshing_while_the_caller_blocks(pool: cloudmap.Pool) -> None:
    widget = pool.widget()
    seen: list[str] = []
    widget.table.observe(lambda change: seen.append(change["new"]), names="value")
    pool.resize(nodes=3)
    time.sleep(6)  # this thread blocks, as a cell does; the widget's own thread goes on
    assert any('data-state="idle" data-kind="dedicated">3<' in value for value in seen)
    assert any('data-target="dedicated">3<' in value for value in seen)


def test_controls_resize_and_set_autoscale(pool: cloudmap.Pool) -> None:
    widget = pool.widget()
    widget.dedicated_input.value = 1
    widget.resize_button.click()
    assert pool.targets == (1, 0)
    assert "target 1 dedicated + 0 spot" in widget.message.value
    wait_until(lambda: len(pool.nodes()) == 1)

    widget.autoscale_toggle.value = True
    widget.min_input.value, widget.max_input.value = 1, 3
    widget.autoscale_button.click()
    assert pool.autoscaling is not None
    assert (pool.autoscaling.min_nodes, pool.autoscaling.max_nodes) == (1, 3)
    assert "1\u20133 nodes" in widget.message.value

    # Bad bounds: the pool's own error under the controls, and the policy unchanged.
    widget.min_input.value, widget.max_input.value = 5, 2
    widget.autoscale_button.click()
    assert "min_nodes" in widget.message.value and "#c62828" in widget.message.value
    assert pool.autoscaling.max_nodes == 3

    widget.autoscale_toggle.value = False
    widget.autoscale_button.click()
    assert pool.autoscaling is None


def test_pool_widget_stops_when_the_pool_closes() -> None:
    pool = cloudmap.Pool(nodes=1)
    widget = pool.widget()
    pool.close()
    wait_until(lambda: not widget._ticker.running, timeout=10)
    assert "closed" in widget.header.value
    assert widget.resize_button.disabled


def test_progress_widget_moves_and_lists_failures(pool: cloudmap.Pool) -> None:
    progress = ProgressWidget(display=False)
    percents: list[str] = []
    progress.summary.observe(
        lambda change: percents.append(change["new"].split('data-percent="')[1].split('"')[0]),
        names="value",
    )
    results = pool.map(slow_square, range(300), on_error="return", progress=progress)
    assert isinstance(results[13], cloudmap.TaskError)
    snap = progress.snapshot
    assert snap is not None and snap.finished
    assert (snap.done, snap.failed, snap.running, snap.queued) == (299, 1, 0, 0)
    assert percents[-1] == "100.0 %"
    assert len(set(percents)) >= 4, f"the bar should move during the map: {percents}"
    assert progress.failure_list is not None and progress.failures is not None
    assert "unlucky 13" in progress.failure_list.value
    assert "Traceback" in progress.failure_list.value  # the remote traceback, escaped
    assert progress.failures.get_title(0) == "Failures (1)"


def test_a_closed_pool_widget_is_replaced_and_a_reporter_can_be_reused(
    pool: cloudmap.Pool,
) -> None:
    first = pool.widget()
    first.close()
    assert not first._ticker.running
    second = pool.widget()
    assert second is not first and second.comm is not None

    progress = ProgressWidget(display=False)
    pool.map(slow_square, range(20), on_error="skip", progress=progress)
    assert progress.failures is not None
    pool.map(slow_square, range(5), progress=progress)
    snap = progress.snapshot
    assert snap is not None and (snap.total, snap.done, snap.failed) == (5, 5, 0)
    assert progress.failures is None and progress.widget.children == (progress.summary,)
    progress.dispose()
    assert progress.widget.comm is None and progress.summary.comm is None


def test_progress_of_submitted_futures(pool: cloudmap.Pool) -> None:
    progress = ProgressWidget(display=False)
    futures = [pool.submit(slow_square, x) for x in (1, 2, 13, 4)]
    watch = pool.progress(futures, reporter=progress, wait=True)
    assert watch.counts.done == 3 and watch.counts.failed == 1
    assert progress.snapshot is not None and progress.snapshot.finished
    assert progress.failure_list is not None
    assert "unlucky 13" in progress.failure_list.value


def test_static_fallbacks_outside_a_kernel(pool: cloudmap.Pool) -> None:
    bundle = pool._repr_mimebundle_()
    assert WIDGET_VIEW not in bundle  # no kernel here: nothing could draw a widget
    assert "cloudmap-node-table" in bundle["text/html"]
    assert "needs a Jupyter front end with ipywidgets" in bundle["text/html"]
    assert bundle["text/plain"].startswith("<cloudmap.Pool local")

    progress = ProgressWidget(display=False)
    pool.map(slow_square, range(5), progress=progress)
    shown = progress._repr_mimebundle_()
    assert set(shown) == {WIDGET_VIEW, "text/html", "text/plain"}
    assert shown["text/plain"].startswith("cloudmap map: 100.0 % 5 done")

    closed = cloudmap.Pool(nodes=1)
    closed.close()
    assert closed._repr_mimebundle_() == {"text/plain": "<cloudmap.Pool closed>"}


def test_a_live_widget_carries_all_three_views(pool: cloudmap.Pool) -> None:
    bundle = with_fallbacks(pool.widget(), "<b>summary</b>", "text")
    assert bundle[WIDGET_VIEW]["model_id"] == pool.widget().model_id
    assert bundle["text/html"].startswith("<b>summary</b>")


def test_jupyter_default_is_the_widget_and_terminals_get_tqdm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloudmap import progress as progress_module

    monkeypatch.setattr(progress_module, "in_jupyter_kernel", lambda: True)
    assert isinstance(make_reporter(None), ProgressWidget)
    assert isinstance(make_reporter(True), ProgressWidget)
    assert make_reporter(False) is None
    monkeypatch.setattr(progress_module, "in_jupyter_kernel", lambda: False)
    assert isinstance(make_reporter(True), progress_module.TqdmReporter)
