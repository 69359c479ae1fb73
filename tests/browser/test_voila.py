"""notebooks/dashboard.ipynb served as a Voilà app: the dashboard appears with its pool
widget, and moving a slider in the page re-runs the map and redraws the chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .conftest import ROOT, shot
from .servers import voila

DASHBOARD = ROOT / "notebooks" / "dashboard.ipynb"


def result_data(page: Any) -> dict[str, str]:
    data: dict[str, str] = page.evaluate(
        """() => {
            const line = document.querySelector('.cloudmap-dashboard-result');
            return line ? {...line.dataset} : {};
        }"""
    )
    return data


def chart_points(page: Any) -> list[str]:
    """The Monte Carlo points' positions as bqplot drew them."""
    points: list[str] = page.evaluate(
        """() => Array.from(document.querySelectorAll('.bqplot .dot'))
            .map(dot => dot.parentElement.getAttribute("transform") || "")"""
    )
    return points


def wait_for_runs(page: Any, runs: int) -> None:
    """Until the result line reports ``runs`` finished runs of the dashboard's map."""
    page.wait_for_function(
        "runs => { const r = document.querySelector('.cloudmap-dashboard-result');"
        " return r && r.dataset.runs === String(runs); }",
        arg=runs,
        timeout=120_000,
    )


def wait_for_full_bar(page: Any) -> None:
    page.wait_for_function(
        "() => { const b = document.querySelector('.cloudmap-progress-bar');"
        " return b && b.dataset.percent === '100.0 %'; }",
        timeout=60_000,
    )


def test_dashboard_runs_as_a_voila_app(tmp_path: Path, page: Any) -> None:
    with voila(DASHBOARD, tmp_path) as server:
        page.goto(server.url, timeout=120_000)
        # The notebook's own cells ran: a first run, then volatility 0.30 set from code.
        wait_for_runs(page, 2)
        assert result_data(page)["volatility"] == "0.30"
        page.wait_for_function(
            "() => document.querySelectorAll('.cloudmap-pool-widget "
            'td[data-state="idle"][data-kind="dedicated"]\').length > 0'
            " && document.querySelector('.cloudmap-pool-widget "
            "td[data-current=\"dedicated\"]').textContent === '2'",
            timeout=60_000,
        )
        wait_for_full_bar(page)
        before = chart_points(page)
        assert len(before) == 20, before
        shot(page, "voila-dashboard-start")

        # Move the volatility slider one step with the keyboard, as a user would.
        handle = page.locator(".widget-slider:has-text('volatility') .noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")
        wait_for_runs(page, 3)
        assert result_data(page)["volatility"] == "0.35"
        wait_for_full_bar(page)
        page.wait_for_timeout(800)  # the chart's 300 ms transition
        after = chart_points(page)
        assert len(after) == 20 and after != before, "the chart should be redrawn"
        shot(page, "voila-dashboard-after-slider")
        dashboard = page.locator(".widget-vbox:has(> .widget-hbox .widget-slider)").first
        shot(page, "voila-dashboard-widgets", dashboard)
