"""Which pool is "current": the pools entered with ``with pool:``, innermost last.

``cloudmap.map``, ``cloudmap.submit`` and joblib's ``"cloudmap"`` backend run on the pool of
the enclosing ``with pool:`` block. The rule follows Dask's ``get_client()``: the pool entered
in this thread (or asyncio task) wins; a thread that entered none, such as a worker thread of
a ``ThreadPoolExecutor`` or of joblib's threading backend started inside the block, gets the
pool most recently entered by any thread that is still inside its block. So work fanned out
to threads lands on the pool the user is looking at, and two threads that each enter their
own pool never see each other's.

The stack lives in a :class:`contextvars.ContextVar` (copied into asyncio tasks, restored on
exit) and, for threads that entered nothing, in one process-wide list. This module imports
no other part of cloudmap: :class:`~cloudmap.pool.Pool` pushes and pops itself here, and
:mod:`cloudmap.module_api` reads the result, so there is no import cycle.
"""

from __future__ import annotations

import contextvars
import os
import threading
from typing import Any

#: Pools entered in this context, innermost last.
_entered: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "cloudmap_entered_pools", default=()
)
#: Every pool inside a ``with`` block in any thread, in the order they were entered.
_everywhere: list[Any] = []
_lock = threading.Lock()


def _without_last(pools: tuple[Any, ...] | list[Any], pool: Any) -> list[Any]:
    """``pools`` without the last occurrence of ``pool`` (by identity: a pool entered twice
    stays current until its outer block ends)."""
    found = list(pools)
    for index in range(len(found) - 1, -1, -1):
        if found[index] is pool:
            del found[index]
            break
    return found


def push(pool: Any) -> None:
    """Make ``pool`` the current pool (``Pool.__enter__``)."""
    _entered.set((*_entered.get(), pool))
    with _lock:
        _everywhere.append(pool)


def pop(pool: Any) -> None:
    """Undo :func:`push` for ``pool`` (``Pool.__exit__``); a pool not entered is ignored."""
    _entered.set(tuple(_without_last(_entered.get(), pool)))
    with _lock:
        _everywhere[:] = _without_last(_everywhere, pool)


def entered() -> Any | None:
    """The innermost pool entered in this context, else the one most recently entered by any
    thread still inside its block, else None. A closed pool is returned as is, so that using
    it raises ``PoolClosedError`` rather than silently starting another pool."""
    mine = _entered.get()
    if mine:
        return mine[-1]
    with _lock:
        return _everywhere[-1] if _everywhere else None


def on_a_node() -> str | None:
    """The node id when this process runs on a pool's node (a slot running a task), else None.

    Tasks do not start pools of their own by accident: a node has no pool to be current.
    """
    return os.environ.get("CLOUDMAP_NODE_ID") or None
