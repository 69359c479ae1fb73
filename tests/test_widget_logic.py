"""Pure logic behind the displays: progress numbers, rates, durations, cost, HTML escaping."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cloudmap import InputError, NodePrices, ProgressCounts, ScalingSample
from cloudmap.nodes import NodeInfo, NodeState
from cloudmap.pricing import spend
from cloudmap.widgets import render
from cloudmap.widgets.summary import (
    RateMeter,
    format_duration,
    node_table,
    progress_snapshot,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def sample(seconds: float, dedicated: int, spot: int) -> ScalingSample:
    return ScalingSample(
        time=T0 + timedelta(seconds=seconds),
        target_dedicated=dedicated,
        target_spot=spot,
        dedicated=dedicated,
        spot=spot,
        states={},
        queued_tasks=0,
        running_tasks=0,
    )


def test_progress_segments_partition_the_items() -> None:
    counts = ProgressCounts(total=100, done=40, failed=2, in_flight=30, running=10)
    snap = progress_snapshot(counts, "map", elapsed=4.0, rate=10.0, finished=False)
    assert (snap.done, snap.failed, snap.running, snap.queued) == (40, 2, 10, 48)
    assert snap.widths() == {"done": 40.0, "failed": 2.0, "running": 10.0, "queued": 48.0}
    assert snap.percent == 42.0
    assert snap.eta == pytest.approx(5.8)


def test_running_never_exceeds_what_is_in_flight() -> None:
    counts = ProgressCounts(total=10, done=9, in_flight=1, running=5)  # a stale recount
    snap = progress_snapshot(counts, "map", elapsed=1.0, rate=None, finished=False)
    assert snap.running == 1 and snap.queued == 0


def test_unknown_total_has_no_percent_and_no_eta() -> None:
    counts = ProgressCounts(total=None, done=5, in_flight=8, running=3)
    snap = progress_snapshot(counts, "imap", elapsed=1.0, rate=5.0, finished=False)
    assert snap.percent is None and snap.eta is None
    assert snap.queued == 5
    assert sum(snap.widths().values()) == pytest.approx(100.0)


def test_finished_shows_nothing_running_and_a_zero_eta() -> None:
    counts = ProgressCounts(total=3, done=3, running=2)
    snap = progress_snapshot(counts, "map", elapsed=1.0, rate=None, finished=True)
    assert snap.running == 0 and snap.eta == 0.0 and snap.percent == 100.0


def test_an_empty_map_is_complete() -> None:
    snap = progress_snapshot(ProgressCounts(total=0), "map", elapsed=0, rate=None, finished=True)
    assert snap.percent == 100.0
    assert set(snap.widths().values()) == {0.0}


def test_percent_text_never_rounds_up_to_100() -> None:
    counts = ProgressCounts(total=10_000, done=9_999)
    snap = progress_snapshot(counts, "map", elapsed=1, rate=None, finished=False)
    assert 'data-percent="99.9 %"' in render.progress_bar_html(snap)


def test_rate_meter_uses_a_recent_window() -> None:
    meter = RateMeter(window=10.0)
    assert meter.add(0, now=0.0) is None
    assert meter.add(100, now=0.2) is None  # too short to tell
    for second in range(1, 31):
        rate = meter.add(100 * second, now=float(second))
    assert rate == pytest.approx(100.0)
    # It slows down: the window follows within ten seconds.
    for second in range(31, 45):
        rate = meter.add(3000 + 10 * (second - 30), now=float(second))
    assert rate == pytest.approx(10.0, rel=0.2)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "\u2014"), (0, "0:00"), (7.4, "0:07"), (750, "12:30"), (7384, "2:03:04")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_spend_bills_each_sample_until_the_next() -> None:
    prices = NodePrices(dedicated=1.0, spot=0.25)
    history = [sample(0, 2, 0), sample(1800, 2, 4), sample(3600, 0, 0)]
    # Half an hour of 2 dedicated (1.0), then half an hour of 2 dedicated + 4 spot (1.5).
    assert spend(history, prices) == pytest.approx(2.5)
    assert spend(history[:1], prices) == 0.0
    assert prices.per_hour(3, 4) == 4.0
    # A pool that pays for one more VM than its nodes (Azure's scheduler on a node).
    with_scheduler = NodePrices(dedicated=1.0, spot=0.25, overhead=1.0)
    assert spend(history, with_scheduler) == pytest.approx(3.5)
    assert with_scheduler.per_hour(0, 0) == 1.0


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_node_prices_refuse_nonsense(bad: object) -> None:
    with pytest.raises(InputError, match="price >= 0"):
        NodePrices(dedicated=bad, spot=0.1)  # type: ignore[arg-type]


def test_node_table_splits_states_by_kind() -> None:
    def node(state: NodeState, dedicated: bool) -> NodeInfo:
        return NodeInfo(id="n", state=state, dedicated=dedicated, slots=1, since=T0)

    table = node_table(
        [
            node(NodeState.IDLE, True),
            node(NodeState.IDLE, False),
            node(NodeState.RUNNING, False),
            node(NodeState.UNUSABLE, True),
        ]
    )
    assert table["idle"] == (1, 1) and table["running"] == (0, 1)
    assert table["creating"] == (0, 0)  # every common state has a row
    assert table["unusable"] == (1, 0)  # a rare one only when seen


def test_failures_are_escaped() -> None:
    error = ValueError("<script>alert(1)</script>")
    html = render.failures_html((error,), failed=3)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "and 2 more" in html
