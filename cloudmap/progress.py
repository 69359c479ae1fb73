"""Progress reporting for map, imap and friends: a tiny protocol any display can plug into.

The map engine calls ``start``, ``update`` and ``close`` on a reporter with a
:class:`ProgressCounts`. In a terminal the reporter is a tqdm bar; in a Jupyter kernel, the
progress widget that cloudmap registers with :func:`set_notebook_reporter`.
:func:`set_default_reporter_factory` replaces both.

A reporter may also take what the map's items print (:class:`OutputReporter`): the engine
then hands it those lines instead of printing them itself, which is how they stay with the
display (under the right cell, or above a tqdm bar without breaking it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: Failures a display keeps with their tracebacks; ``failed`` still counts them all.
FAILURES_KEPT = 100


@dataclass
class ProgressCounts:
    """Items of one map: ``total`` is None while the input's length is unknown.

    ``retried`` counts attempts that failed and were tried again (they spend ``retries``);
    ``requeued`` counts items sent again free of charge: their node was preempted or
    removed, their slot died while they only waited on it, or they shared a task with an
    item that crashed its slot (re-run in halves to find it). ``in_flight`` items were sent
    and are not back; ``running`` of them are in tasks a slot has started. ``failures``
    holds the first :data:`FAILURES_KEPT` items that failed for good, with tracebacks.
    """

    total: int | None
    done: int = 0
    failed: int = 0
    retried: int = 0
    requeued: int = 0
    in_flight: int = 0
    running: int = 0
    failures: list[Exception] = field(default_factory=list)

    @property
    def queued(self) -> int:
        """Items not finished and not running: waiting on a slot, or not sent yet."""
        if self.total is None:
            return max(0, self.in_flight - self.running)
        return max(0, self.total - self.done - self.failed - self.running)

    def add_failure(self, error: Exception) -> None:
        self.failed += 1
        if len(self.failures) < FAILURES_KEPT:
            self.failures.append(error)


@runtime_checkable
class ProgressReporter(Protocol):
    def start(self, counts: ProgressCounts, description: str) -> None: ...

    def update(self, counts: ProgressCounts) -> None: ...

    def close(self, counts: ProgressCounts) -> None: ...


@runtime_checkable
class OutputReporter(Protocol):
    """The optional part of a reporter: it shows what the items print and log.

    ``text`` is one or more complete lines, each ending in a newline and prefixed with its
    item and node (``[item 12 node-1] ...``); ``stream`` is "stdout" or "stderr". It may be
    called from the thread that runs the map, which is not always the cell's (a non-blocking
    map runs in a background thread), and never blocks for long.
    """

    def write_output(self, text: str, stream: str) -> None: ...


def output_writer(reporter: ProgressReporter | None) -> Callable[[str, str], None] | None:
    """The reporter's :meth:`OutputReporter.write_output`, or None when it has none."""
    if isinstance(reporter, OutputReporter):
        return reporter.write_output
    return None


ReporterFactory = Callable[[], ProgressReporter | None]

_default_factory: ReporterFactory | None = None
_notebook_factory: ReporterFactory | None = None


def set_default_reporter_factory(factory: ReporterFactory | None) -> None:
    """Choose what ``progress=None`` (the default) shows, e.g. a Jupyter widget.

    The factory returns a reporter, or None to fall back to the terminal rule.
    """
    global _default_factory
    _default_factory = factory


def set_notebook_reporter(factory: ReporterFactory | None) -> None:
    """Choose the display of progress inside a Jupyter kernel when nothing else is chosen.

    cloudmap's progress widget registers here (from :mod:`cloudmap.pool`), so that this
    module, which the widgets build on, never imports them.
    """
    global _notebook_factory
    _notebook_factory = factory


class TqdmReporter:
    """A tqdm bar on stderr: done items, with failures and retries in the postfix."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, counts: ProgressCounts, description: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=counts.total, desc=description, unit="item", leave=True)

    def update(self, counts: ProgressCounts) -> None:
        if self._bar is None:
            return
        self._bar.update(counts.done + counts.failed - self._bar.n)
        if counts.failed or counts.retried or counts.requeued:
            self._bar.set_postfix(
                failed=counts.failed,
                retried=counts.retried,
                requeued=counts.requeued,
                refresh=False,
            )

    def close(self, counts: ProgressCounts) -> None:
        if self._bar is not None:
            self.update(counts)
            self._bar.close()
            self._bar = None

    def write_output(self, text: str, stream: str) -> None:
        """Items' lines above the bar (``tqdm.write``), which is redrawn below them."""
        file = sys.stderr if stream == "stderr" else sys.stdout
        if self._bar is None:
            file.write(text)
            return
        from tqdm.auto import tqdm

        tqdm.write(text, file=file, end="")


def make_reporter(progress: Any) -> ProgressReporter | None:
    """Turn the ``progress=`` argument into a reporter (or None for no progress).

    ``False``: none. ``True``: the default display. ``None``: the default display when there
    is one to show on (a registered widget factory, a Jupyter kernel, a terminal on stderr).
    A reporter object or a factory returning one is used as given. Inside a Jupyter kernel
    the default display is cloudmap's progress widget; elsewhere a tqdm bar.
    """
    if progress is False:
        return None
    if isinstance(progress, ProgressReporter):
        return progress
    if callable(progress):
        reporter: ProgressReporter | None = progress()
        return reporter
    if _default_factory is not None:
        reporter = _default_factory()
        if reporter is not None:
            return reporter
    if _notebook_factory is not None and in_jupyter_kernel():
        reporter = _notebook_factory()
        if reporter is not None:
            return reporter
    if progress is True or _stderr_is_terminal():
        return TqdmReporter()
    return None


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (notebook, JupyterLab, VS Code), not plain IPython."""
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    ipython = shell.get_ipython()
    return ipython is not None and hasattr(ipython, "kernel")


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
