"""What ``display(pool)`` and ``display(progress)`` send to the front end.

A live widget's bundle holds ``application/vnd.jupyter.widget-view+json``, which only a
front end with ipywidgets can draw. Next to it go ``text/html`` (a static summary with a
note saying the live view needs ipywidgets) and ``text/plain``, so GitHub, nbviewer and
exported notebooks show the numbers instead of a model id, and a front end without the
widget extension shows a message instead of an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import render

if TYPE_CHECKING:
    import ipywidgets

    from .summary import PoolSource


def with_fallbacks(widget: ipywidgets.Widget | None, html: str, text: str) -> dict[str, Any]:
    bundle: dict[str, Any] = {}
    if widget is not None:
        bundle.update(widget._repr_mimebundle_() or {})
    bundle["text/html"] = html + render.static_note_html()
    bundle["text/plain"] = text
    return bundle


def pool_bundle(pool: PoolSource) -> dict[str, Any]:
    """The pool's live widget in a Jupyter kernel; a static summary anywhere else."""
    from ..progress import in_jupyter_kernel
    from .summary import pool_snapshot

    text = repr(pool)
    if pool.closed:
        return {"text/plain": text}
    snap = pool_snapshot(pool)
    widget = pool.widget() if in_jupyter_kernel() else None
    return with_fallbacks(widget, render.pool_html(snap), text)


def close_tree(widget: ipywidgets.Widget) -> None:
    """Close a widget and every widget inside it (children, accordion panes, chart parts),
    so that nothing of a display it replaced stays registered in the kernel."""
    from ipywidgets import Widget

    for name in ("children", "marks", "axes"):
        for part in getattr(widget, name, None) or ():
            if isinstance(part, Widget):
                close_tree(part)
    widget.close()
