"""The pool's node counts over time, drawn with bqplot (see docs/decisions/0004).

Lines for the nodes the pool holds (all, and spot) and a dashed line for the target, from
the pool's scaling history. Only the last :data:`WINDOW_SECONDS` are drawn, so the chart
stays readable and each update stays small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from bqplot import Axis, DateScale, Figure, LinearScale, Lines
from ipywidgets import Layout

from ..samples import ScalingSample

#: How much history the chart shows.
WINDOW_SECONDS = 15 * 60
#: Up to this many nodes the y axis ticks every whole node.
MAX_TICKS = 12


class NodeChart:
    """A bqplot figure of node counts and targets; ``update`` redraws it from samples."""

    def __init__(self) -> None:
        x = DateScale()
        y = LinearScale(min=0.0)
        self.nodes = Lines(
            x=np.array([], dtype="datetime64[ms]"),
            y=np.zeros((2, 0)),
            scales={"x": x, "y": y},
            colors=["#1565c0", "#ef6c00"],
            labels=["nodes", "spot nodes"],
            display_legend=True,
            interpolation="step-after",
            stroke_width=2,
        )
        self.target = Lines(
            x=np.array([], dtype="datetime64[ms]"),
            y=np.zeros(0),
            scales={"x": x, "y": y},
            colors=["#546e7a"],
            labels=["target"],
            display_legend=True,
            line_style="dashed",
            interpolation="step-after",
        )
        self.figure = Figure(
            marks=[self.nodes, self.target],
            axes=[
                Axis(scale=x, label="time", num_ticks=5, tick_format="%H:%M:%S"),
                Axis(scale=y, side="left", label="nodes", tick_format="d"),
            ],
            legend_location="top-left",
            animation_duration=0,
            fig_margin={"top": 10, "bottom": 40, "left": 50, "right": 10},
            layout=Layout(height="220px", width="100%", min_width="320px"),
        )
        self.figure.add_class("cloudmap-node-chart")
        self._drawn = 0.0

    def update(self, history: Sequence[ScalingSample]) -> None:
        """Draw the samples of the last :data:`WINDOW_SECONDS` (no-op if nothing is new)."""
        if not history:
            return
        latest = history[-1].time.timestamp()
        if latest == self._drawn:
            return
        self._drawn = latest
        shown = [s for s in history if latest - s.time.timestamp() <= WINDOW_SECONDS]
        times = np.array([s.time.replace(tzinfo=None) for s in shown], dtype="datetime64[ms]")
        counts = np.array([[s.dedicated + s.spot for s in shown], [s.spot for s in shown]])
        targets = np.array([s.target_dedicated + s.target_spot for s in shown])
        top = max(1, int(counts.max(initial=0)), int(targets.max(initial=0)))
        with self.nodes.hold_sync(), self.target.hold_sync():
            self.nodes.x, self.nodes.y = times, counts
            self.target.x, self.target.y = times, targets
        self.nodes.scales["y"].max = float(top + 1)
        axis = self.figure.axes[1]
        if top <= MAX_TICKS:  # whole nodes only: no 0.5 ticks on a small pool
            axis.tick_values = np.arange(0, top + 2)
        else:
            axis.tick_values = None
