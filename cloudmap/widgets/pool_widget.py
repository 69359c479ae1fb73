"""The live pool widget: nodes by state and kind, a node-count chart, slots, tasks, cost,
and controls to resize the pool or set its autoscale bounds.

It reads the pool once a second on a thread of its own (a :class:`cloudmap.loops.Periodic`),
so it keeps moving while a cell blocks on a map. The controls act when the kernel is free:
Jupyter delivers button clicks to the kernel's main thread between cells.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import ipywidgets as widgets

from ..errors import CloudmapError
from ..loops import Periodic
from . import render
from .chart import NodeChart
from .summary import PoolSnapshot, PoolSource, pool_snapshot, provider_of

#: Seconds between refreshes (the issue asks for at least one a second).
REFRESH_SECONDS = 1.0


class PoolWidget(widgets.VBox):
    """``pool.widget()``: what the pool is and does, updated every second."""

    def __init__(self, pool: PoolSource, *, interval: float = REFRESH_SECONDS) -> None:
        self._pool = weakref.ref(pool)  # the widget must not keep a dropped pool alive
        self._lock = threading.Lock()
        self.header = widgets.HTML()
        self.table = widgets.HTML()
        self.work = widgets.HTML()
        self.chart = NodeChart()
        self.message = widgets.HTML()
        self.snapshot: PoolSnapshot | None = None
        controls = self._make_controls(pool)
        super().__init__(
            children=[
                self.header,
                widgets.HBox(
                    [self.table, self.work], layout=widgets.Layout(grid_gap="24px", width="100%")
                ),
                self.chart.figure,
                controls,
                self.message,
            ],
            layout=widgets.Layout(width="100%", max_width="860px"),
        )
        self.add_class("cloudmap-pool-widget")
        self.refresh()
        self._ticker = Periodic(self.refresh, interval, "cloudmap-pool-widget")
        self._ticker.start()

    # -- reading the pool ---------------------------------------------------------------

    def refresh(self) -> bool:
        """Redraw from the pool; False once the pool is closed (the ticker then stops)."""
        pool = self._pool()
        with self._lock:
            if pool is None or pool.closed:
                self._show_closed()
                return False
            try:
                snap = pool_snapshot(pool)
            except Exception:
                if pool.closed:  # closed while we read it: whatever failed, say "closed"
                    self._show_closed()
                    return False
                raise
            self.snapshot = snap
            self._set(self.header, render.pool_header_html(snap))
            self._set(self.table, render.node_table_html(snap))
            self._set(self.work, render.pool_work_html(snap))
            self.chart.update(snap.history)
            return True

    def _show_closed(self) -> None:
        if self.snapshot is not None:
            self._set(self.header, render.pool_header_html(self.snapshot, closed=True))
        for control in self._controls:
            control.disabled = True

    @staticmethod
    def _set(widget: widgets.HTML, value: str) -> None:
        if widget.value != value:  # send only what changed
            widget.value = value

    # -- controls -------------------------------------------------------------------------

    def _make_controls(self, pool: PoolSource) -> widgets.Widget:
        dedicated, spot = pool.targets
        policy = pool.autoscaling
        number = {"min": 0, "max": 10_000, "layout": widgets.Layout(width="150px")}
        self.dedicated_input = widgets.BoundedIntText(
            value=dedicated, description="nodes", **number
        )
        self.spot_input = widgets.BoundedIntText(value=spot, description="spot", **number)
        self.resize_button = widgets.Button(description="Resize", icon="arrows-v")
        self.resize_button.on_click(self._resize)
        self.autoscale_toggle = widgets.Checkbox(
            value=policy is not None,
            description="autoscale",
            indent=False,
            layout=widgets.Layout(width="100px"),
        )
        self.min_input = widgets.BoundedIntText(
            value=policy.min_nodes if policy else 0, description="min", **number
        )
        self.max_input = widgets.BoundedIntText(
            value=policy.max_nodes if policy else max(1, dedicated + spot),
            description="max",
            **number,
        )
        self.autoscale_button = widgets.Button(description="Apply", icon="check")
        self.autoscale_button.on_click(self._apply_autoscale)
        self._controls: list[Any] = [
            self.dedicated_input,
            self.spot_input,
            self.resize_button,
            self.autoscale_toggle,
            self.min_input,
            self.max_input,
            self.autoscale_button,
        ]
        if not provider_of(pool).supports_spot:
            self.spot_input.disabled = True
        return widgets.VBox(
            [
                widgets.HBox([self.dedicated_input, self.spot_input, self.resize_button]),
                widgets.HBox(
                    [self.autoscale_toggle, self.min_input, self.max_input, self.autoscale_button]
                ),
            ]
        )

    def _act(self, what: str, action: Any) -> None:
        """Run a control's action; say what happened, or what was wrong, under the controls."""
        pool = self._pool()
        if pool is None or pool.closed:
            self.message.value = render.message_html("The pool is closed.", error=True)
            return
        try:
            done = action(pool)
        except CloudmapError as exc:
            self.message.value = render.message_html(str(exc), error=True)
            return
        self.message.value = render.message_html(f"{what}: {done}")
        self.refresh()

    def _resize(self, _button: Any = None) -> None:
        nodes, spot = self.dedicated_input.value, self.spot_input.value

        def resize(pool: PoolSource) -> str:
            if pool.autoscaling is not None:
                pool.autoscale(None)  # a resize by hand takes over from autoscale
                self.autoscale_toggle.value = False
            pool.resize(nodes=nodes, spot_nodes=spot if provider_of(pool).supports_spot else None)
            return f"target {nodes} dedicated + {spot} spot"

        self._act("resized", resize)

    def _apply_autoscale(self, _button: Any = None) -> None:
        low, high, on = self.min_input.value, self.max_input.value, self.autoscale_toggle.value

        def apply(pool: PoolSource) -> str:
            if not on:
                pool.autoscale(None)
                return "off; the pool keeps its nodes"
            policy = pool.autoscale(min_nodes=low, max_nodes=high)
            assert policy is not None
            return f"{policy.min_nodes}\u2013{policy.max_nodes} nodes"

        self._act("autoscale", apply)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop refreshing and close the widget's views."""
        from .display import close_tree

        self._ticker.stop()
        for child in self.children:
            close_tree(child)
        super().close()
