"""Jupyter displays of a pool and of its work: live ipywidgets, with static fallbacks.

``summary`` computes what to show from plain values, ``render`` turns it into HTML (shared
by the live widgets and the static ``text/html`` fallbacks), ``chart`` draws node counts
over time with bqplot, and ``pool_widget`` / ``progress_widget`` put them together.
Nothing here decides anything about scheduling; it only reads the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool_widget import PoolWidget
    from .progress_widget import ProgressWidget

__all__ = ["PoolWidget", "ProgressWidget"]


def __getattr__(name: str) -> Any:  # ipywidgets and bqplot load only when a widget is made
    if name == "PoolWidget":
        from .pool_widget import PoolWidget

        return PoolWidget
    if name == "ProgressWidget":
        from .progress_widget import ProgressWidget

        return ProgressWidget
    raise AttributeError(name)
