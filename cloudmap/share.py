"""Shared data: ``big = pool.share(obj)`` sends an object to each node once, not with every task.

A function that closes over a large object carries it in its pickle, and every task of a
map carries the function: a 200 MB array used by a thousand tasks moves 200 GB. Sharing
pickles the object once, names it by a hash of that pickle, and stores it on the pool's
scheduler (which every node reaches, wherever it runs). What the user holds is a small
handle, :class:`Shared`, which pickles as its name alone; when a task's function or item is
unpickled on a slot, the handle turns back into the object:

- the slot process keeps the objects it has resolved (later tasks pay nothing);
- on a miss it looks in the node's shared directory, where the node's first slot to need
  the object left a copy: one slot per node fetches it from the scheduler, under a file lock,
  and the node's other slots (and slots restarted later) read that copy;
- a node that joins later fetches it the same way, when its first task needs it.

The scheduler counts every fetch by node (:meth:`Shared.transfers`). Closing the pool drops
the store with its scheduler.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import cloudpickle

from .errors import PoolClosedError, SerializationError, SharedDataError

T = TypeVar("T")

#: Where a node keeps the shared objects its slots fetched, under its shared directory.
NODE_FOLDER = ".cloudmap-shared"
#: Objects a slot process keeps resolved (each task of a map resolves the same few).
PROCESS_CACHE_ENTRIES = 16

_cache: OrderedDict[str, Any] = OrderedDict()
_cache_lock = threading.Lock()
#: This process's own handles by digest: on the client, resolving gives the object itself.
_local: weakref.WeakValueDictionary[str, Shared[Any]] = weakref.WeakValueDictionary()


class Shared(Generic[T]):
    """A handle to an object sent to the pool's nodes once, made by :meth:`Pool.share`.

    Pass it to tasks as you would the object: close over it in the function, or pass it as
    an argument or item. In a task it *is* the object (``big[i]`` indexes the array), since
    unpickling the handle on a slot gives the object back. On the client, :meth:`result`
    gives the object, as ``future.result()`` does for data that Dask's ``scatter`` sent.

    Treat the object as read-only: each slot process keeps one copy for all its tasks, so a
    change made by one task is seen by the next tasks of that slot, and by no other slot.

    Attributes
    ----------
    digest : str
        The name of the object: a hash (BLAKE2b) of its pickle.
    nbytes : int
        The size of its pickle: what moves to each node once.
    """

    __slots__ = ("__weakref__", "_client", "_value", "digest", "nbytes")

    def __init__(self, digest: str, nbytes: int, value: T, client: Any) -> None:
        self.digest = digest
        self.nbytes = nbytes
        self._value = value
        self._client = weakref.ref(client)

    def result(self) -> T:
        """The object itself (this process's, not a copy)."""
        return self._value

    def transfers(self) -> dict[str, int]:
        """How many times each node fetched the object from the scheduler, by node id.

        One per node that needed it, however many tasks and slots used it; a node that
        never ran a task using it is absent.
        """
        from .scheduler_plugin import shared_transfers

        client = self._client()
        if client is None or client.status in ("closing", "closed"):
            raise PoolClosedError(
                "the pool this object was shared with is closed, and its counts with it"
            )
        return shared_transfers(client, self.digest)

    def __reduce__(self) -> tuple[Callable[[str, int], Any], tuple[str, int]]:
        return (resolve, (self.digest, self.nbytes))

    def __repr__(self) -> str:
        kind = type(self._value).__name__
        return f"<Shared {kind}, {_size_text(self.nbytes)} pickled, {self.digest[:12]}>"


def share(obj: T, client: Any) -> Shared[T]:
    """Pickle ``obj`` once, store it on the scheduler of ``client`` and return its handle.

    An object that cannot be pickled raises :class:`~cloudmap.SerializationError` at once,
    before anything is sent. A handle of this pool is returned as it is; a handle of another
    pool shares its object with this one.
    """
    if isinstance(obj, Shared):
        if obj._client() is client:
            return obj
        obj = obj.result()
    try:
        blob = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"the object passed to pool.share ({_short_repr(obj)}) cannot be pickled to send "
            f"to the nodes ({exc}); share plain data (arrays, lists, dicts, dataframes), and "
            "create things that live only in one process (open files, locks, clients) "
            "inside the task instead"
        ) from exc
    digest = hashlib.blake2b(blob, digest_size=16).hexdigest()
    from .scheduler_plugin import put_shared

    put_shared(client, digest, blob)
    handle: Shared[T] = Shared(digest, len(blob), obj, client)
    _local[digest] = handle
    return handle


def resolve(digest: str, nbytes: int) -> Any:
    """Unpickling a :class:`Shared` handle: the object it names.

    In the process that shared it, the object itself. In a slot, this process's copy, or
    else the node's copy, or else (one slot per node) the scheduler's.
    """
    handle = _local.get(digest)
    if handle is not None:
        return handle.result()
    with _cache_lock:
        if digest in _cache:
            _cache.move_to_end(digest)
            return _cache[digest]
    value = _load(digest, nbytes)
    with _cache_lock:
        _cache[digest] = value
        while len(_cache) > PROCESS_CACHE_ENTRIES:
            _cache.popitem(last=False)
    return value


def _load(digest: str, nbytes: int) -> Any:
    """The object from the node's copy, fetching that copy first if no slot has yet.

    A copy is written under a temporary name and renamed, so a copy that exists is whole
    and is read without the lock; only a miss takes the lock, and looks again once it
    holds it (another slot may have fetched the object meanwhile).
    """
    shared_dir = os.environ.get("CLOUDMAP_NODE_SHARED_DIR")
    if not shared_dir:  # a Dask worker that cloudmap did not start: no node directory
        return pickle.loads(_fetch(digest, nbytes))
    folder = Path(shared_dir) / NODE_FOLDER
    path = folder / digest
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"{digest}.lock").open("a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
            if not path.exists():
                blob = _fetch(digest, nbytes)
                _keep(blob, folder, path)
                return pickle.loads(blob)
    with path.open("rb") as copy:
        return pickle.load(copy)


def _keep(blob: memoryview, folder: Path, path: Path) -> None:
    """Leave the node's copy for its other slots; a node that cannot (its disk is full)
    still runs the task, and its next slot fetches the object again."""
    temporary = folder / f".{path.name}.{os.getpid()}"
    try:
        temporary.write_bytes(blob)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)


def _fetch(digest: str, nbytes: int) -> memoryview:
    from .scheduler_plugin import fetch_shared

    try:
        blob = fetch_shared(digest)
    except LookupError as exc:
        raise SharedDataError(
            f"a shared object ({_size_text(nbytes)}, {digest[:12]}) was unpickled outside "
            "the tasks of its pool, where it cannot be fetched; use the handle in the "
            "functions and items of that pool's map, imap and submit, or call "
            "handle.result() on the client"
        ) from exc
    if blob is None:
        raise SharedDataError(
            f"this pool's scheduler does not hold the shared object {digest[:12]} "
            f"({_size_text(nbytes)}): it was shared with another pool; call "
            "pool.share(obj) on the pool that runs the task"
        )
    return blob


def _size_text(nbytes: int) -> str:
    if nbytes >= 1_000_000:
        return f"{nbytes / 1e6:.1f} MB"
    if nbytes >= 1_000:
        return f"{nbytes / 1e3:.1f} kB"
    return f"{nbytes} bytes"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
