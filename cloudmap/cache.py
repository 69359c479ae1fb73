"""``cache=``: a map's results kept in storage as they arrive, so a re-run computes only what
is missing.

A result is stored under a key of the function's hash (:mod:`cloudmap.fingerprint`), the
seed, the item and its index. The function and seed choose a folder under the cache URL; in
it, append-only *part* files each map item keys to pickled values. Results are written as
they arrive, batched (one part per ~0.5 s, never one file per item: maps have millions), so
a run that dies with its kernel loses at most the last half second. A part is self-checking
(length and SHA-256 in its header): one cut short by a kill is skipped when read, and its
items are computed again; nothing else is lost. Reading lists and loads the parts once,
before the map starts.

:class:`CachedMapEngine` is a :class:`~cloudmap.engine.MapEngine` that hands out the cached
results and runs only the missing items, with their original indices, so seeds and
``{index}`` are those of a fresh run and the results are identical to it. Items that
failed (``on_error="return"`` or ``"skip"``) are not stored: a re-run tries them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pickle
import struct
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import cloudpickle

from .cluster import DaskCluster
from .engine import SKIPPED, Chunk, MapEngine
from .errors import InputError, TaskError
from .fingerprint import function_hash, value_digest
from .options import MapOptions

#: Seconds between writes of new results (one part file each).
FLUSH_SECONDS = 0.5
#: New results that make a write happen before FLUSH_SECONDS have passed.
FLUSH_ITEMS = 100_000
#: A cached map reads its whole input first, to look every item up; an input longer than
#: this is taken for an endless generator.
MAX_ITEMS = 10_000_000
#: Parts found when a map starts beyond which they are merged into one (fewer files to list
#: and read next time).
COMPACT_PARTS = 64
_MAGIC = b"cloudmap-cache-part-1\n"
_HEADER = struct.Struct("<Q32s")  # payload length, SHA-256 of the payload
_PART_SUFFIX = ".part"
_INT_KEY = struct.Struct("<Qq")
_INT64 = (-(2**63), 2**63 - 1)


class CacheWriteWarning(RuntimeWarning):
    """Results of a map with ``cache=`` could not be stored; the map went on without."""


class ResultCache:
    """The stored results of one function and seed: one folder under the cache URL.

    Use :meth:`for_map` to open it (it checks that the URL can be written); :meth:`load`
    reads what is there; :meth:`add` and :meth:`flush` store new results.
    """

    def __init__(self, fs: Any, folder: str, url: str) -> None:
        self.fs = fs
        self.folder = folder
        self.url = url
        self._pending: list[tuple[bytes, Any]] = []
        self._last_write = time.monotonic()
        self.parts_written = 0
        self.write_failed = False

    @classmethod
    def for_map(
        cls,
        fn: Callable[..., Any],
        arity: int,
        options: MapOptions,
        *,
        staged: bool = False,
    ) -> ResultCache | None:
        """The cache a map's ``cache=`` option names (None without it), checked before any
        work: the URL must be writable, the function must have a reproducible hash, and
        the map must not stage files."""
        url = options.cache
        if url is None:
            return None
        if isinstance(url, os.PathLike):
            url = os.fspath(url)
        if not isinstance(url, str) or not url:
            raise InputError(
                f"cache={options.cache!r} is not valid: pass a folder or an fsspec URL "
                "(for example cache='results/' or cache='abfs://container/cache/')"
            )
        if staged:
            raise InputError(
                "pool.run does not take cache=: a command's results are the files it writes; "
                "keep those in outputs= and skip items whose outputs exist instead"
            )
        if options.inputs or options.outputs:
            raise InputError(
                "cache= does not go with inputs= or outputs=: a cached result could not tell "
                "whether an input file changed, and a cached item would not upload its "
                "outputs again; drop cache=, or read and write the files inside the function"
            )
        code = function_hash(fn)  # InputError, naming what cannot be hashed
        seed = "noseed" if options.seed is None else f"seed{options.seed}"
        star = "" if arity == 1 else f"-star{arity}"
        fs, root = _filesystem(url, options.storage_options or {})
        cache = cls(fs, f"{root.rstrip('/')}/{code[:32]}-{seed}{star}", url)
        cache.probe()
        return cache

    def probe(self) -> None:
        """Write, read back and remove a small file, so that a cache that cannot be written
        fails now, before any work, and not after the first results are computed."""
        probe = f"{self.folder}/.probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.folder, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # object stores: make the bucket
                self.fs.mkdir(self.folder, create_parents=True)
            self.fs.pipe_file(probe, b"ok")
            if self.fs.cat_file(probe) != b"ok":
                raise OSError("the file written did not read back the same")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise InputError(
                f"cache={self.url!r} cannot be written ({type(exc).__name__}: {exc}); pass a "
                "folder or URL you may write to (with storage_options= holding its "
                "credentials), or drop cache="
            ) from None

    # -- reading ------------------------------------------------------------------------

    def load(self) -> dict[bytes, Any]:
        """Every stored result, by item key. Parts that are cut short or do not check out
        are skipped (their items are simply computed again)."""
        try:
            paths = self._parts()
            blobs = self.fs.cat(paths, on_error="omit") if paths else {}
        except Exception as exc:
            raise InputError(
                f"cache={self.url!r} cannot be read ({type(exc).__name__}: {exc}); check the "
                "URL and its credentials (storage_options=), or drop cache="
            ) from None
        stored: dict[bytes, Any] = {}
        good: list[str] = []
        for path in sorted(blobs):
            entries = _read_part(blobs[path])
            if entries is None:
                continue
            good.append(path)
            stored.update(entries)
        if len(good) > COMPACT_PARTS:
            self._compact(good, stored)
        return stored

    def _parts(self) -> list[str]:
        self.fs.invalidate_cache(self.folder)  # other processes may have written since
        try:
            names = self.fs.ls(self.folder, detail=False)
        except FileNotFoundError:
            return []
        return [name for name in names if name.rsplit("/", 1)[-1].endswith(_PART_SUFFIX)]

    def _compact(self, paths: list[str], stored: dict[bytes, Any]) -> None:
        """Merge many parts into one: the merged part is written (and checks out) before
        the parts it replaces are removed, so a kill in between only leaves duplicates."""
        try:
            self._write(list(stored.items()))
            self.fs.rm(paths)
        except Exception:
            pass  # merging only saves time next run; the parts are still good

    # -- writing ------------------------------------------------------------------------

    def add(self, key: bytes, value: Any) -> None:
        """Queue one result; written by the next :meth:`flush`."""
        self._pending.append((key, value))

    def add_many(self, entries: Iterable[tuple[bytes, Any]]) -> None:
        """Queue (key, value) pairs; written by the next :meth:`flush`."""
        self._pending.extend(entries)

    def flush(self, *, force: bool = True) -> None:
        """Write the queued results as one part (unless ``force`` is False and the last
        write was less than :data:`FLUSH_SECONDS` ago)."""
        if not self._pending:
            return
        now = time.monotonic()
        recent = now - self._last_write < FLUSH_SECONDS
        if not force and recent and len(self._pending) < FLUSH_ITEMS:
            return
        entries, self._pending = self._pending, []
        self._last_write = now
        try:
            self._write(entries)
        except Exception as exc:  # storage is down or full: the map itself goes on
            self._pending = entries + self._pending  # tried again at the next flush
            if not self.write_failed:
                warnings.warn(
                    f"cache={self.url!r}: results could not be stored ({type(exc).__name__}: "
                    f"{exc}); the map goes on and returns every result, and stores them if "
                    "the storage comes back; a re-run computes the ones not stored",
                    CacheWriteWarning,
                    stacklevel=2,
                )
            self.write_failed = True

    def _write(self, entries: list[tuple[bytes, Any]]) -> None:
        payload = cloudpickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
        header = _HEADER.pack(len(payload), hashlib.sha256(payload).digest())
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{_PART_SUFFIX}"
        self.fs.pipe_file(f"{self.folder}/{name}", _MAGIC + header + payload)
        self.parts_written += 1

    @staticmethod
    def key(index: int, item: Any) -> bytes:
        """An item's key: its index and a hash of the item (canonical when it has one,
        else of its pickle, which at worst misses); an int item as itself (16 bytes, so
        never equal to a hashed key's 24: maps over ranges look a million items up in a
        fraction of a second)."""
        if type(item) is int and _INT64[0] <= item <= _INT64[1]:
            return _INT_KEY.pack(index, item)
        try:
            digest = value_digest(item)
        except TypeError:
            digest = b"p" + hashlib.sha256(cloudpickle.dumps(item, protocol=4)).digest()
        return struct.pack("<Q", index) + digest[:16]


class CachedMapEngine(MapEngine):
    """A map engine that hands out cached results and runs only the missing items.

    The missing items keep their input indices (``MapEngine(indices=...)``), so their
    seeds and ``{index}`` are those of a fresh run. Results are stored as they come back,
    from the thread iterating :meth:`chunks`, at most every :data:`FLUSH_SECONDS`, and once
    more when the map ends in any way.
    """

    def __init__(
        self,
        cluster: DaskCluster,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        cache: ResultCache,
        slots: Callable[[], int],
        is_closed: Callable[[], bool],
        ordered: bool = True,
        label: str = "map",
    ) -> None:
        items = _finite_items(iterables)
        self._cache = cache
        self._keys = [ResultCache.key(index, item) for index, item in enumerate(items)]
        stored = cache.load()
        self._hits: dict[int, Any] = {
            index: stored[key] for index, key in enumerate(self._keys) if key in stored
        }
        missing = [index for index in range(len(items)) if index not in self._hits]
        runs: tuple[Iterable[Any], ...]
        if len(iterables) == 1:
            runs = ([items[index] for index in missing],)
        else:
            runs = tuple([items[index][k] for index in missing] for k in range(len(iterables)))
        super().__init__(
            cluster,
            fn,
            runs,
            options,
            slots=slots,
            is_closed=is_closed,
            ordered=ordered,
            label=label,
            indices=missing,
        )
        self.total_items = len(items)
        self.cached_items = len(self._hits)
        self._counts.total = len(items)
        self._counts.done = len(self._hits)
        self._next = 0  # ordered: the first input index not handed out yet

    def chunks(self, deadline: float | None = None) -> Iterator[Chunk]:
        """As :meth:`MapEngine.chunks`, with the cached results among them (all at once,
        first, when not ordered)."""
        try:
            if not self._ordered:
                if self._hits:
                    cached = sorted(self._hits)
                    yield cached, [self._hits.pop(index) for index in cached]
            elif self._hits:  # the cached results before the first missing item, now
                yield self._merged(self._indices[0] if self._indices else self.total_items)
            for indices, values in super().chunks(deadline):
                self._keep(indices, values)
                if not self._ordered or not self._hits:
                    yield indices, values
                    continue
                out_indices: list[int] = []
                out_values: list[Any] = []
                for index, value in zip(indices, values, strict=True):
                    if index > self._next:
                        cached_indices, cached_values = self._merged(index)
                        out_indices += cached_indices
                        out_values += cached_values
                    out_indices.append(index)
                    out_values.append(value)
                    self._next = index + 1
                yield out_indices, out_values
            if self._ordered and self._hits:
                yield self._merged(self.total_items)
        except BaseException:
            self._keep_dict(MapEngine.buffered_results(self))  # computed: keep it anyway
            raise
        finally:
            self._cache.flush()

    def buffered_results(self) -> dict[int, Any]:
        """Results not handed out yet, cached ones included (attached to errors)."""
        return {**self._hits, **super().buffered_results()}

    def _merged(self, stop: int) -> tuple[list[int], list[Any]]:
        """The cached results from the first index not handed out up to ``stop``."""
        indices = list(range(self._next, max(self._next, stop)))
        values = [self._hits.pop(index) for index in indices]
        self._next = max(self._next, stop)
        return indices, values

    def _keep(self, indices: Sequence[int], values: list[Any]) -> None:
        keys = self._keys
        self._cache.add_many(
            (keys[index], value)
            for index, value in zip(indices, values, strict=True)
            if value is not SKIPPED and not isinstance(value, TaskError)
        )
        self._cache.flush(force=False)

    def _keep_dict(self, results: dict[int, Any]) -> None:
        # Already failing: the error being raised says more than one from storing.
        with contextlib.suppress(Exception):
            self._keep(list(results), list(results.values()))


def _finite_items(iterables: tuple[Iterable[Any], ...]) -> list[Any]:
    """The whole input (tuples of items for several iterables): a cached map looks every
    item up before it starts. An endless generator is refused."""
    if not iterables:
        raise InputError("map needs at least one iterable of items after the function")
    source: Iterable[Any] = iterables[0] if len(iterables) == 1 else zip(*iterables, strict=True)
    try:
        items = list(itertools.islice(source, MAX_ITEMS + 1))
    except ValueError as exc:
        raise InputError(
            f"the iterables passed to map have different lengths ({exc}); "
            "pass iterables of equal length"
        ) from None
    except TypeError as exc:
        raise InputError(f"the items passed to map are not iterable ({exc})") from None
    if len(items) > MAX_ITEMS:
        raise InputError(
            f"cache= reads the whole input first, to look every item up, and this input has "
            f"more than {MAX_ITEMS:,} items (an endless generator?); pass a finite list, or "
            "split the input into maps of fewer items, or drop cache= (imap without cache= "
            "reads its input lazily)"
        )
    return items


def _filesystem(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    try:
        import fsspec

        return fsspec.core.url_to_fs(url, **storage_options)
    except Exception as exc:  # an unknown protocol, a missing package, bad options
        raise InputError(
            f"cache={url!r} cannot be opened ({type(exc).__name__}: {exc}); pass a folder or "
            "an fsspec URL whose package is installed (abfs:// needs adlfs), with "
            "storage_options= for its credentials"
        ) from None


def _read_part(blob: bytes) -> list[tuple[bytes, Any]] | None:
    """A part's entries, or None if it was cut short or does not check out."""
    start = len(_MAGIC) + _HEADER.size
    if not blob.startswith(_MAGIC) or len(blob) < start:
        return None
    length, digest = _HEADER.unpack_from(blob, len(_MAGIC))
    payload = blob[start:]
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        return None
    try:
        entries = pickle.loads(payload)
    except Exception:
        return None  # a value whose class is gone: recompute those items
    return entries if isinstance(entries, list) else None
