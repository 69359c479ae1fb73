"""HTML for the displays, shared by the live widgets and the static fallbacks.

Inline styles only: the same markup must look right inside JupyterLab, VS Code, Voilà, an
exported HTML file and GitHub's notebook view, none of which load our CSS. Every number
also sits in a ``data-*`` attribute, so tests (and scripts) read values, not layout.
"""

from __future__ import annotations

import html
import traceback

from ..errors import TaskError
from ..task_output import log_location
from .summary import RARE_STATES, SEGMENTS, PoolSnapshot, ProgressSnapshot, format_duration

COLOURS = {
    "done": "#2e7d32",
    "failed": "#c62828",
    "running": "#1565c0",
    "queued": "#cfd8dc",
}
#: Text colours of the counts (queued's bar grey is too light for text).
TEXT_COLOURS = {**COLOURS, "queued": "#546e7a", "retried": "#ef6c00"}
_MUTED = "color:#78909c"
_DOT = " \u00b7 "
_CELL = "padding:1px 10px;text-align:right"
#: Shown by front ends that cannot draw ipywidgets (GitHub, nbviewer, a missing extension).
STATIC_NOTE = (
    "A snapshot: the live view needs a Jupyter front end with ipywidgets 8 "
    "(JupyterLab 4, Notebook 7, VS Code or Voil\u00e0)."
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


# -- progress -------------------------------------------------------------------------------


def progress_bar_html(snap: ProgressSnapshot) -> str:
    """One stacked bar: done, failed, running and queued items, left to right."""
    widths = snap.widths()
    parts = "".join(
        f'<div class="cloudmap-seg cloudmap-seg-{name}" title="{name}: {getattr(snap, name):,}" '
        f'style="width:{widths[name]:.3f}%;background:{COLOURS[name]}"></div>'
        for name in SEGMENTS
    )
    percent = snap.percent
    data = " ".join(f'data-{name}="{getattr(snap, name)}"' for name in (*SEGMENTS, "retried"))
    return (
        f'<div class="cloudmap-progress-bar" data-percent="{_e(_percent_text(percent))}" '
        f'data-total="{_e(snap.total if snap.total is not None else "")}" {data} '
        f'data-finished="{str(snap.finished).lower()}" '
        'style="display:flex;height:16px;width:100%;min-width:240px;border-radius:3px;'
        f'overflow:hidden;background:{COLOURS["queued"]}">{parts}</div>'
    )


def progress_stats_html(snap: ProgressSnapshot) -> str:
    """The counts, the rate, elapsed time and ETA under the bar."""
    percent = snap.percent
    head = f"<b>{_percent_text(percent)}</b>" if percent is not None else "<b>?</b>"
    total = f" of {snap.total:,}" if snap.total is not None else ""
    counts = (
        ("done", f"{snap.done:,}{total} done"),
        ("running", f"{snap.running:,} running"),
        ("queued", f"{snap.queued:,} queued"),
        ("failed", f"{snap.failed:,} failed"),
        ("retried", f"{snap.retried:,} retried"),
    )
    coloured = [f'<span style="color:{TEXT_COLOURS[name]}">{text}</span>' for name, text in counts]
    if snap.requeued:
        coloured.append(f'<span style="{_MUTED}">{snap.requeued:,} requeued</span>')
    rate = f"{snap.rate:,.1f} items/s" if snap.rate is not None else "\u2014 items/s"
    timing = (
        f"{rate} \u00b7 elapsed {format_duration(snap.elapsed)} \u00b7 "
        f"ETA {format_duration(snap.eta)}"
    )
    state = f"{_DOT}finished" if snap.finished else ""
    return (
        f'<div class="cloudmap-progress-stats" style="font-size:12px;line-height:1.5">'
        f"{head}{_DOT}{_DOT.join(coloured)}<br>"
        f'<span style="{_MUTED}">{timing}{state}</span></div>'
    )


def progress_title_html(snap: ProgressSnapshot) -> str:
    items = f"{snap.total:,} items" if snap.total is not None else "items"
    return (
        f'<div class="cloudmap-progress-title" style="font-size:12px">'
        f"<b>cloudmap</b> {_e(snap.description)} \u00b7 {items}</div>"
    )


def failures_html(failures: tuple[Exception, ...], failed: int) -> str:
    """Each failure as a collapsed entry that opens to its traceback, and to the item's
    output when it printed or logged something."""
    if not failures:
        return '<div class="cloudmap-failures" data-count="0">No failures.</div>'
    entries = []
    for error in failures:
        summary, trace = _failure_text(error)
        entries.append(
            f"<details><summary>{_e(summary)}</summary>"
            f'<pre style="font-size:11px;white-space:pre-wrap">{_e(trace)}</pre>'
            f"{_failure_output_html(error)}</details>"
        )
    more = (
        f'<div style="{_MUTED}">and {failed - len(failures):,} more</div>'
        if failed > len(failures)
        else ""
    )
    return (
        f'<div class="cloudmap-failures" data-count="{failed}" style="font-size:12px">'
        f"{''.join(entries)}{more}</div>"
    )


def _failure_output_html(error: Exception) -> str:
    """The failed item's own output (its last 64 KB), and where the whole of it is."""
    output = getattr(error, "output", "")
    if not isinstance(output, str) or not output:
        return ""
    lines = output.count("\n") or 1
    worker = getattr(error, "worker", None)
    where = (
        f'<div style="{_MUTED}">All of the slot\'s output: {_e(log_location(worker))}</div>'
        if worker
        else ""
    )
    return (
        f'<details class="cloudmap-failure-output" style="margin-left:12px">'
        f"<summary>Output ({lines:,} lines)</summary>"
        f'<pre style="font-size:11px;white-space:pre-wrap;max-height:300px;overflow:auto">'
        f"{_e(output)}</pre>{where}</details>"
    )


def _failure_text(error: Exception) -> tuple[str, str]:
    cause = getattr(error, "exception", None)
    shown = cause if isinstance(cause, BaseException) else error
    message = f"{type(shown).__name__}: {shown}"
    if isinstance(error, TaskError):
        where = f", node {error.node}" if error.node else ""
        summary = f"item {error.index}{where}, {error.attempts} attempt(s): {message}"
    else:
        summary = message
    trace = getattr(error, "remote_traceback", None) or "".join(
        traceback.format_exception(type(shown), shown, shown.__traceback__)
    )
    return summary, str(trace)


def progress_summary_html(snap: ProgressSnapshot) -> str:
    """Title, bar and numbers: the live widget's main part."""
    return f"{progress_title_html(snap)}{progress_bar_html(snap)}{progress_stats_html(snap)}"


def progress_html(snap: ProgressSnapshot) -> str:
    """The whole progress display as one static block (the text/html fallback)."""
    failures = (
        f"<details><summary>Failures ({snap.failed:,})</summary>"
        f"{failures_html(snap.failures, snap.failed)}</details>"
        if snap.failed
        else ""
    )
    return f'<div class="cloudmap-progress">{progress_summary_html(snap)}{failures}</div>'


def progress_text(snap: ProgressSnapshot) -> str:
    percent = snap.percent
    head = f"{_percent_text(percent)} " if percent is not None else ""
    return (
        f"cloudmap {snap.description}: {head}{snap.done:,} done, {snap.running:,} running, "
        f"{snap.queued:,} queued, {snap.failed:,} failed, {snap.retried:,} retried"
    )


def _percent_text(percent: float | None) -> str:
    if percent is None:
        return ""
    # Never show 100 % before the last item is in: floor to a tenth.
    return f"{int(percent * 10) / 10:.1f} %"


# -- pool -----------------------------------------------------------------------------------


def pool_header_html(snap: PoolSnapshot, *, closed: bool = False) -> str:
    scaling = (
        f"autoscale {snap.autoscale.min_nodes}\u2013{snap.autoscale.max_nodes} nodes"
        if snap.autoscale is not None
        else "fixed size"
    )
    status = ' \u00b7 <b style="color:#c62828">closed</b>' if closed else ""
    return (
        f'<div class="cloudmap-pool-header" style="font-size:13px"><b>cloudmap pool</b> '
        f'\u00b7 <span data-provider="{_e(snap.provider)}">{_e(snap.provider)}</span> '
        f"\u00b7 {_e(snap.node_size)} \u00b7 {scaling}{status}</div>"
    )


def node_table_html(snap: PoolSnapshot) -> str:
    """Nodes by state, dedicated and spot, with the targets and the current counts."""
    rows = []
    for state, (dedicated, spot) in snap.states.items():
        if state in {str(s) for s in RARE_STATES} and not dedicated + spot:
            continue
        style = "" if dedicated + spot else f' style="{_MUTED}"'
        rows.append(
            f'<tr{style}><td style="padding:1px 10px">{_e(state)}</td>'
            f'<td style="{_CELL}" data-state="{_e(state)}" data-kind="dedicated">{dedicated}</td>'
            f'<td style="{_CELL}" data-state="{_e(state)}" data-kind="spot">{spot}</td></tr>'
        )
    (target_d, target_s), (current_d, current_s) = snap.target, snap.current
    rows.append(
        '<tr style="border-top:1px solid #b0bec5"><td style="padding:1px 10px">current</td>'
        f'<td style="{_CELL}" data-current="dedicated">{current_d}</td>'
        f'<td style="{_CELL}" data-current="spot">{current_s}</td></tr>'
        '<tr><td style="padding:1px 10px">target</td>'
        f'<td style="{_CELL}" data-target="dedicated">{target_d}</td>'
        f'<td style="{_CELL}" data-target="spot">{target_s}</td></tr>'
    )
    return (
        '<table class="cloudmap-node-table" style="font-size:12px;border-collapse:collapse">'
        '<thead><tr><th style="padding:1px 10px;text-align:left">nodes</th>'
        f'<th style="{_CELL}">dedicated</th><th style="{_CELL}">spot</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def pool_work_html(snap: PoolSnapshot) -> str:
    """Slots busy, tasks queued / running / done, and the cost where prices are known."""
    tasks = snap.tasks
    lines = [
        f'<span data-slots-busy="{snap.slots_busy}" data-slots-total="{snap.slots_total}">'
        f"slots busy <b>{snap.slots_busy}</b> of {snap.slots_total}</span>",
        f'<span data-tasks-queued="{tasks.queued}" data-tasks-running="{tasks.running}" '
        f'data-tasks-done="{tasks.done}">tasks: {tasks.queued:,} queued \u00b7 '
        f"{tasks.running:,} running \u00b7 {tasks.done:,} done</span>",
    ]
    if snap.prices is not None and snap.cost_per_hour is not None and snap.spent is not None:
        currency = _e(snap.prices.currency)
        lines.append(
            f'<span data-cost-per-hour="{snap.cost_per_hour:.4f}" data-spent="{snap.spent:.4f}">'
            f"cost {snap.cost_per_hour:,.2f} {currency}/hour \u00b7 spent {snap.spent:,.2f} "
            f"{currency} (estimate)</span>"
        )
    else:
        lines.append(
            f'<span style="{_MUTED}">cost: the {_e(snap.provider)} provider has no prices</span>'
        )
    for error in snap.allocation_errors:
        lines.append(
            f'<span data-allocation-error style="color:{COLOURS["failed"]}">'
            f"short of target: {_e(error)}</span>"
        )
    return (
        '<div class="cloudmap-pool-work" style="font-size:12px;line-height:1.6">'
        + "<br>".join(lines)
        + "</div>"
    )


def pool_html(snap: PoolSnapshot, *, closed: bool = False) -> str:
    """The whole pool as one static block (the text/html fallback)."""
    return (
        f'<div class="cloudmap-pool">{pool_header_html(snap, closed=closed)}'
        f'<div style="display:flex;gap:24px;align-items:flex-start">{node_table_html(snap)}'
        f"{pool_work_html(snap)}</div></div>"
    )


def static_note_html() -> str:
    return f'<div class="cloudmap-static-note" style="font-size:11px;{_MUTED}">{STATIC_NOTE}</div>'


def message_html(text: str, *, error: bool = False) -> str:
    """A line under the pool's controls: what a control did, or what was wrong."""
    colour = COLOURS["failed"] if error else COLOURS["done"]
    return f'<span class="cloudmap-message" style="color:{colour}">{_e(text)}</span>'
