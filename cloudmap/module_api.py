"""``cloudmap.map``, ``imap``, ``map_async``, ``submit`` and ``cloudmap.current_pool()``.

For code that should not have to carry a pool around (a library function, a script written
before there was a pool), these run on the *current* pool: the innermost ``with pool:``
block's (see :mod:`cloudmap.current` for the rule across threads), or else a default local
pool. The default pool is ``cloudmap.Pool()`` with its defaults, made on first use, reused
after, closed when the interpreter exits (``atexit``) and made again if it was closed: the
same lifetime as ``concurrent.futures``' or joblib's implicit worker pools. Inside a task on a
node there is no current pool, and none is made: that would start a pool per slot.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import current
from .errors import InputError
from .futures import Future
from .pool import Pool
from .runs import MapRun

_default: Pool | None = None
_default_lock = threading.Lock()
_atexit_registered = False


def current_pool() -> Pool:
    """The pool that ``cloudmap.map`` and joblib's ``"cloudmap"`` backend use right now.

    The pool of the innermost enclosing ``with pool:`` block; outside any block, the
    default local pool (``cloudmap.Pool()``), started on first use and closed at exit.

    Returns
    -------
    cloudmap.Pool

    Raises
    ------
    InputError
        When called inside a task on a node, where no pool is current.

    Examples
    --------
    >>> with cloudmap.Pool(nodes=2) as pool:          # doctest: +SKIP
    ...     assert cloudmap.current_pool() is pool
    """
    pool = current.entered()
    if pool is not None:
        return pool
    return _default_pool()


def _default_pool() -> Pool:
    """The default local pool, made now if there is none or it was closed."""
    global _default, _atexit_registered
    with _default_lock:  # held while starting: two threads must not start two pools
        if _default is None or _default.closed:
            node = current.on_a_node()
            if node is not None:
                raise InputError(
                    f"this code runs inside a task on {node}, where there is no current pool "
                    "and cloudmap does not start one for each slot; return the inputs to the "
                    "client and map there, or create a cloudmap.Pool(...) explicitly"
                )
            _default = Pool()
            if not _atexit_registered:
                atexit.register(_close_default_pool)
                _atexit_registered = True
        return _default


def _close_default_pool() -> None:
    """At exit: stop the default pool's nodes and scheduler (nothing is left running)."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.close()


@functools.cache
def _options_of(method: str) -> frozenset[str]:
    """The keyword options of ``Pool.<method>`` (read from its signature, so they stay in
    step with the pool's)."""
    parameters = inspect.signature(getattr(Pool, method)).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _check(where: str, method: str, fn: Any, options: dict[str, Any]) -> None:
    """Refuse what no pool could take before a default pool is started for it."""
    known = _options_of(method)
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(
            f"{where} does not take {', '.join(unknown)}; its options are those of "
            f"pool.{method}: {', '.join(sorted(known))}"
        )
    if not callable(fn):
        raise InputError(f"{fn!r} is not callable: pass a function as the first argument")


def map(fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> Any:
    """``current_pool().map(fn, *iterables, **options)``: one call per item, results in order.

    Takes every option of :meth:`cloudmap.Pool.map` (``seed=``, ``retries=``,
    ``on_error=``...). Inside ``with pool:`` it runs on that pool, otherwise on the default
    local pool.

    Examples
    --------
    >>> import cloudmap
    >>> cloudmap.map(abs, [-1, -2, 3])                 # doctest: +SKIP
    [1, 2, 3]
    >>> with cloudmap.Pool(nodes=2) as pool:           # doctest: +SKIP
    ...     squares = cloudmap.map(pow, range(4), [2] * 4, retries=1)   # on ``pool``
    """
    _check("cloudmap.map", "map", fn, options)
    return current_pool().map(fn, *iterables, **options)


def imap(fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
    """``current_pool().imap(fn, *iterables, **options)``: results as they come.

    Takes every option of :meth:`cloudmap.Pool.imap` (``ordered=False`` and those of
    ``map``). The pool is chosen at the call, so the iteration stays on it.

    Examples
    --------
    >>> for result in cloudmap.imap(abs, [-1, -2, 3], ordered=False):   # doctest: +SKIP
    ...     print(result)
    """
    _check("cloudmap.imap", "imap", fn, options)
    return current_pool().imap(fn, *iterables, **options)


def map_async(fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> MapRun:
    """``current_pool().map_async(fn, *iterables, **options)``: :func:`map` in the
    background, a :class:`~cloudmap.MapRun` returned at once.

    Examples
    --------
    >>> run = cloudmap.map_async(abs, [-1, -2, 3])     # doctest: +SKIP
    >>> run.result()                                    # doctest: +SKIP
    [1, 2, 3]
    """
    _check("cloudmap.map_async", "map_async", fn, options)
    return current_pool().map_async(fn, *iterables, **options)


def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
    """``current_pool().submit(fn, *args, **kwargs)``: one call, a ``concurrent.futures`` Future.

    Every keyword goes to ``fn``, as with :meth:`cloudmap.Pool.submit`.

    Examples
    --------
    >>> cloudmap.submit(pow, 2, 10).result()          # doctest: +SKIP
    1024
    """
    _check("cloudmap.submit", "submit", fn, {})
    return current_pool().submit(fn, *args, **kwargs)
