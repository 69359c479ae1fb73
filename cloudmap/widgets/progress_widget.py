"""The progress widget of map, imap, run, mpi_map and watched futures.

The map engine calls ``update`` from the thread that runs the map (the cell's thread) at
least every 0.1 s while it waits, so the widget moves while ``map`` blocks the cell. The
widget redraws at most every :data:`MIN_REDRAW` seconds: a map of tiny items reports
thousands of times a second, and each redraw is a message to the browser.

What the items print comes to ``write_output`` and goes into an output area under the bar:
an ipywidgets ``Output`` appended to with ``append_stdout``, which stays under the widget's
own cell whichever thread runs the map (a non-blocking map runs in a background thread).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets as widgets

from ..progress import ProgressCounts
from . import render
from .summary import ProgressSnapshot, RateMeter, progress_snapshot

#: Seconds between redraws while running (the last redraw always happens).
MIN_REDRAW = 0.2


class ProgressWidget:
    """A reporter (see :class:`cloudmap.ProgressReporter`) that draws a stacked bar of done,
    failed, running and queued items, the rate, elapsed time and ETA, what the items print
    (``output``, an area under the bar), and a list of failures that opens to their
    tracebacks and each failed item's own output.

    Pass ``display=False`` to place ``.widget`` yourself (in a dashboard, say) instead of
    having it shown under the cell when the work starts.
    """

    def __init__(self, *, display: bool = True) -> None:
        self._display = display
        # Few widget models: each is a message to open, and a map may be short.
        self.summary = widgets.HTML(layout=widgets.Layout(width="100%"))
        #: The items' printed and logged lines, made when the first line arrives.
        self.output: widgets.Output | None = None
        #: The expandable failure list, made when the first item fails.
        self.failures: widgets.Accordion | None = None
        self.failure_list: widgets.HTML | None = None
        self.widget = widgets.VBox([self.summary], layout=widgets.Layout(max_width="860px"))
        self.widget.add_class("cloudmap-progress-widget")
        self.snapshot: ProgressSnapshot | None = None
        self._description = ""
        self._started = time.monotonic()
        self._rate = RateMeter()
        self._last_draw = 0.0
        self._failures_drawn = -1
        self._lock = threading.Lock()
        self._handle: Any = None

    # -- the reporter protocol -------------------------------------------------------------

    def start(self, counts: ProgressCounts, description: str) -> None:
        self._description = description
        self._started = time.monotonic()
        self._rate = RateMeter()  # a reporter may be reused: nothing of the last run counts
        self._failures_drawn = -1
        self._drop_output()
        self._draw(counts, finished=False)
        if self._display:
            from IPython.display import display

            self._handle = display(self, display_id=True)

    def update(self, counts: ProgressCounts) -> None:
        if time.monotonic() - self._last_draw >= MIN_REDRAW:
            self._draw(counts, finished=False)

    def close(self, counts: ProgressCounts) -> None:
        self._draw(counts, finished=True)
        if self._handle is not None:
            # Once more with the final numbers in the static text/html and text/plain
            # views, which is what GitHub, nbviewer and exports show.
            self._handle.update(self)

    def write_output(self, text: str, stream: str) -> None:
        """Lines the items printed or logged (:class:`cloudmap.progress.OutputReporter`)."""
        with self._lock:
            if self.output is None:
                self.output = widgets.Output(
                    layout=widgets.Layout(max_height="240px", overflow="auto")
                )
                self.output.add_class("cloudmap-progress-output")
                rest = self.widget.children[1:]
                self.widget.children = (self.summary, self.output, *rest)
            if stream == "stderr":
                self.output.append_stderr(text)
            else:
                self.output.append_stdout(text)

    def _drop_output(self) -> None:
        """A reused reporter starts without the last run's lines."""
        with self._lock:
            if self.output is None:
                return
            from .display import close_tree

            output, self.output = self.output, None
            self.widget.children = tuple(c for c in self.widget.children if c is not output)
            close_tree(output)

    # -- drawing ---------------------------------------------------------------------------

    def _draw(self, counts: ProgressCounts, *, finished: bool) -> None:
        with self._lock:  # a watcher thread and the cell's thread may both report
            now = time.monotonic()
            self._last_draw = now
            finished_items = counts.done + counts.failed
            elapsed = now - self._started
            rate = self._rate.add(finished_items, now)
            if rate is None and finished and elapsed > 0:
                rate = finished_items / elapsed  # too short for a window: the whole run
            snap = progress_snapshot(
                counts,
                self._description,
                elapsed=elapsed,
                rate=rate,
                finished=finished,
            )
            self.snapshot = snap
            _set(self.summary, render.progress_summary_html(snap))
            if snap.failed != self._failures_drawn:
                self._failures_drawn = snap.failed
                self._show_failures(snap)

    def _show_failures(self, snap: ProgressSnapshot) -> None:
        if not snap.failed:  # a reused reporter: the last run's failures go
            if self.failures is not None:
                from .display import close_tree

                failures = self.failures
                self.widget.children = tuple(c for c in self.widget.children if c is not failures)
                close_tree(failures)
                self.failures = self.failure_list = None
            return
        if self.failures is None or self.failure_list is None:
            self.failure_list = widgets.HTML()
            self.failures = widgets.Accordion(children=[self.failure_list], selected_index=None)
            self.widget.children = (*self.widget.children, self.failures)
        self.failures.set_title(0, f"Failures ({snap.failed:,})")
        self.failure_list.value = render.failures_html(snap.failures, snap.failed)

    def dispose(self) -> None:
        """Close the widget and its parts in the kernel (a dashboard replacing it, say);
        views of it in the page go blank. Not ``close``: that is the reporter's end."""
        from .display import close_tree

        close_tree(self.widget)

    # -- display -------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live widget, plus a static summary for front ends that cannot draw it."""
        from .display import with_fallbacks

        snap = self.snapshot
        if snap is None:
            return {"text/plain": "cloudmap progress (not started)"}
        return with_fallbacks(self.widget, render.progress_html(snap), render.progress_text(snap))


def _set(widget: widgets.HTML, value: str) -> None:
    if widget.value != value:
        widget.value = value
