"""The wire format of a task: one pickled blob of items in, one pickled blob of results out.

Dask walks every argument of a task looking for keys; a list of a hundred thousand items
costs microseconds per item there, a single ``bytes`` object costs nothing. So a task carries
exactly two blobs (the function, pickled once per map, and the batch) and returns one.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import cloudpickle

from .errors import RemoteException

#: How an item is turned into a call of the user's function.
CALL_ONE = 0  # fn(item)
CALL_STAR = 1  # fn(*item): map over several iterables
CALL_ARGS = 2  # fn(*args, **kwargs): item is (args, kwargs), used by submit

#: Dask event topics a slot uses to tell the client what Dask itself does not report.
TIMEOUT_TOPIC = "cloudmap-timeout"  # an item overran: the partial result, sent before dying
STARTED_TOPIC = "cloudmap-started"  # a task began on this slot (so a death can be attributed)
#: What items print and log, sent while they run (see cloudmap.task_output): a message is
#: {"tag": the map's output tag, "key": task key, "slot": slot name, "lines": [[index,
#: stream, text], ...], "dropped": lines this slot held back since its last message}. (Not
#: "worker": the scheduler sets that key of a slot's event to the slot's address.)
OUTPUT_TOPIC = "cloudmap-output"
#: The ``stream`` of an output line.
STDOUT = 0
STDERR = 1


class Batch(NamedTuple):
    """What one task runs: ``items[i]`` is input item number ``indices[i]``.

    The slot only iterates and indexes ``items``, so any sequence works there (a slice of a
    ``range`` input travels as three numbers). With a ``budget`` (seconds), the slot starts no
    new item once the batch has run that long, and reports how many it completed; the map
    engine sends the rest again. A batch whose size is still a guess can then be large
    without risking a long task: this is how the first batches of a map may be big.

    With an ``output`` tag (the map's), the slot captures what the items print and log and
    sends it to the client under that tag while they run (:data:`OUTPUT_TOPIC`); None
    (``capture_output=False``, ``submit``) leaves it in the slot's log only.
    """

    call: int
    seed: int | None
    timeout: float | None
    indices: range | list[int]
    items: Sequence[Any]
    budget: float | None = None
    output: str | None = None


@dataclass
class RemoteError:
    """One item's failure as it travels back: the exception if it pickles, else its text.

    ``output`` is what the item printed and logged before it failed (its last lines, at
    most about 64 KB) when its map captures output: the error shows it where the live
    lines were cut by the rate limit.
    """

    exception_blob: bytes
    type_name: str
    message: str
    traceback: str
    output: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> RemoteError:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            blob = cloudpickle.dumps(exc)
        except Exception:
            blob = b""
        return cls(blob, type(exc).__name__, str(exc), text)

    def exception(self) -> BaseException:
        """The original exception when it can be rebuilt here, else a stand-in."""
        if self.exception_blob:
            try:
                exc = pickle.loads(self.exception_blob)
            except Exception:
                pass
            else:
                if isinstance(exc, BaseException):
                    # The text traceback is kept in .traceback; a rebuilt traceback object
                    # would only hold frames (and through them, Dask futures) alive.
                    return exc.with_traceback(None)
        return RemoteException(self.type_name, self.message)


class BatchResult(NamedTuple):
    """What one task sends back.

    ``values[i]`` is the result of ``batch.items[i]`` unless ``i`` is in ``errors``.
    ``completed`` is how many leading items were processed; less than the batch length
    only when the task was cancelled or cut by a timeout.
    """

    worker: str | None
    compute_seconds: float
    values: list[Any]
    errors: dict[int, RemoteError]
    completed: int


def dump_batch(batch: Batch) -> bytes:
    return cloudpickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)


def load_batch(blob: bytes) -> Batch:
    return pickle.loads(blob)


def dump_result(result: BatchResult) -> bytes:
    """Pickle a result; a value that cannot be pickled becomes that item's error alone."""
    try:
        return cloudpickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    values = list(result.values)
    errors = dict(result.errors)
    for position, value in enumerate(values):
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            wrapped = TypeError(
                f"the function's return value could not be pickled to send back: {exc}; "
                "return plain data (numbers, arrays, dicts...) instead"
            )
            errors[position] = RemoteError.from_exception(wrapped)
            values[position] = None
    return cloudpickle.dumps(result._replace(values=values, errors=errors))


def load_result(blob: bytes) -> BatchResult:
    return pickle.loads(blob)


#: A function that pickles to more than this carries something large with every task.
LARGE_FUNCTION_BYTES = 1_000_000


class LargeFunctionWarning(UserWarning):
    """A map's or submit's function pickles to over 1 MB: it captures a large object, which
    every task carries. ``big = pool.share(obj)`` sends it to each node once instead."""


def dump_function(fn: Any) -> bytes:
    """Pickle the user's function once per map or submit, with a useful error if it can't be.

    A function over :data:`LARGE_FUNCTION_BYTES` is sent anyway, with a
    :class:`LargeFunctionWarning` that points at ``pool.share``.
    """
    if not callable(fn):
        from .errors import InputError

        raise InputError(f"{fn!r} is not callable: pass a function as the first argument")
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        blob = cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        from .errors import SerializationError

        raise SerializationError(
            f"the function {name} cannot be pickled to send to the nodes ({exc}); "
            "it probably captures something that lives only in this process (an open file, "
            "a lock, a client); create such things inside the function instead"
        ) from exc
    if len(blob) > LARGE_FUNCTION_BYTES:
        warnings.warn(
            LargeFunctionWarning(
                f"the function {name} pickles to {len(blob) / 1e6:.1f} MB, and every task "
                "carries it: it captures a large object; send that object to each node once "
                "with big = pool.share(obj) and use big in the function instead"
            ),
            stacklevel=_caller_outside_cloudmap(),
        )
    return blob


def _caller_outside_cloudmap() -> int:
    """The ``stacklevel`` of the first caller outside cloudmap: the user's line, whatever
    path (map, imap, submit, executor) led to :func:`dump_function`."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)  # dump_function's own frame: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level


def dump_items_batch(batch: Batch) -> bytes:
    """Pickle a batch; if an item cannot be pickled, say which one."""
    try:
        return dump_batch(batch)
    except Exception as exc:
        from .errors import SerializationError

        for index, item in zip(batch.indices, batch.items, strict=True):
            try:
                cloudpickle.dumps(item)
            except Exception as item_exc:
                raise SerializationError(
                    f"item {index} ({_short_repr(item)}) cannot be pickled to send to the "
                    f"nodes ({item_exc}); pass plain data (numbers, strings, arrays, paths)"
                ) from item_exc
        raise SerializationError(f"a batch cannot be pickled: {exc}") from exc


def item_bytes(item: Any) -> int:
    """About how many bytes ``item`` adds to a batch: its size pickled alone (at least 1).

    The map engine cuts its first batch, whose size is a guess, by the first item's size.
    """
    try:
        return max(1, len(cloudpickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)))
    except Exception:
        return 1  # dump_items_batch will say which item cannot be pickled


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
