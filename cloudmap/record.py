"""The run record: what a map was, where and when it ran, in a form a reader can rerun.

Every map result carries one (``results.record``, or ``pool.last_run()``): the function's
name and code hash, the seed and options, the item count, the package versions of the
client and of every node that served, the pool's plan, the start and end times, the
scaling history over the run and what it cost where the provider knows prices.
``record.save(path)`` writes it as JSON; :func:`rerun` runs the same map again on any pool.

To rerun, a record keeps the function and the items themselves, pickled (base64 in the
JSON), when they are small enough (:data:`PAYLOAD_LIMIT`); larger inputs, and generators,
are recorded by count (and hash, when known) only, and :func:`rerun` takes them again as
``items=``. A pickled function runs only where the same Python minor version and packages
are installed: the record lists them, so a reader can tell.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import pickle
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

import cloudpickle

from .errors import InputError, PoolClosedError
from .node.compat import versions
from .payload import item_bytes
from .pricing import spend
from .samples import ScalingSample

if TYPE_CHECKING:
    from .cluster import DaskCluster
    from .providers import Provider


class Runner(Protocol):
    """What :func:`rerun` needs of a pool (a :class:`cloudmap.Pool`)."""

    def map(self, fn: Any, /, *iterables: Iterable[Any], **options: Any) -> Any: ...

    def run(self, command: str, items: Iterable[Any], **options: Any) -> Any: ...


#: A record keeps the pickled function and items for :func:`rerun` up to this many bytes.
PAYLOAD_LIMIT = 16 * 2**20
#: The format of a saved record; :meth:`RunRecord.load` refuses others.
FORMAT = "cloudmap.run-record/1"
#: The map options a record keeps and a rerun passes again.
RERUN_OPTIONS = ("seed", "batch_size", "retries", "timeout", "on_error")


@dataclass
class RunRecord:
    """One map: what ran (``function``, ``code_hash``, ``options``, ``items``), where
    (``pool_plan``, ``client_versions``, ``node_versions``) and how it went (``started``,
    ``ended``, ``status``, ``scaling``, ``cost``).

    ``payload`` (the pickled function and items, base64) and ``items_hash`` are filled
    when the record is saved or checked for :attr:`rerunnable`.

    ``status`` is "finished", "failed" (an item failed for good: see ``error``) or
    "cancelled". ``cost`` is in ``currency`` over the run's scaling samples, None where the
    provider does not know prices.
    """

    kind: str
    function: str
    code_hash: str
    seed: int | None
    items: int
    options: dict[str, Any]
    started: str
    ended: str = ""
    status: str = "running"
    error: str = ""
    provider: str = ""
    pool_plan: dict[str, Any] = field(default_factory=dict)
    client_versions: dict[str, str] = field(default_factory=dict)
    node_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    cost: float | None = None
    currency: str = ""
    items_hash: str = ""
    payload: str = field(default="", repr=False)  # base64 pickle of (function, items)

    @property
    def seconds(self) -> float:
        """How long the run took (0 while it runs)."""
        if not self.ended:
            return 0.0
        return (_parse(self.ended) - _parse(self.started)).total_seconds()

    @property
    def rerunnable(self) -> bool:
        """True when the record holds the function (rerun may still need items=)."""
        self._pickle_for_rerun()
        return bool(self.payload)

    def keep_for_rerun(self, fn: Any, iterables: tuple[Iterable[Any], ...]) -> None:
        """Hold the function and items until the record is saved or rerun, when they are
        pickled into ``payload`` (and hashed into ``items_hash``): most records are never
        saved, and pickling a million items at the end of every map would slow it down.
        Inputs too large to keep, and generators, are not held."""
        small = all(_sized(it) for it in iterables) and _small(iterables)
        self.__dict__["_rerun_source"] = (fn, iterables if small else None)

    def _pickle_for_rerun(self) -> None:
        source = self.__dict__.pop("_rerun_source", None)
        if source is not None:
            self.payload, self.items_hash = _payload(*source)

    def to_json(self) -> str:
        self._pickle_for_rerun()
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1, default=str)

    def save(self, path: str, **storage_options: Any) -> str:
        """Write the record as JSON to ``path`` (a file path or an fsspec URL); return it."""
        import fsspec

        with fsspec.open(path, "w", **storage_options) as stream:
            stream.write(self.to_json())
        return path

    @classmethod
    def load(cls, path: str, **storage_options: Any) -> RunRecord:
        """Read a record that :meth:`save` wrote."""
        import fsspec

        with fsspec.open(path, "r", **storage_options) as stream:
            data = json.load(stream)
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise InputError(f"{path} is not a cloudmap run record (saved by record.save)")
        return cls(**data)

    def __repr__(self) -> str:
        took = f", {self.seconds:.1f} s" if self.ended else ""
        return (
            f"<RunRecord {self.kind} {self.function} over {self.items} items, "
            f"seed={self.seed}, {self.status}{took}>"
        )


class MapResult(list[Any]):
    """The list ``map`` returns, with the run's :class:`RunRecord` as ``.record``."""

    record: RunRecord | None = None


def rerun(record: RunRecord | str, pool: Runner, *, items: Iterable[Any] | None = None) -> Any:
    """Run the map a record describes again on ``pool``; return its results.

    ``record`` is a :class:`RunRecord` or the path of one saved with ``record.save``.
    Seeded maps give the same numbers on any pool size. ``items=`` replaces the recorded
    items (needed when the record could not keep them: see :attr:`RunRecord.rerunnable`);
    their hash is checked against the record's when it has one.

    >>> results = pool.map(simulate, range(100), seed=7)            # doctest: +SKIP
    >>> results.record.save("study.json")                             # doctest: +SKIP
    >>> again = cloudmap.rerun("study.json", other_pool)              # doctest: +SKIP
    """
    if isinstance(record, str):
        record = RunRecord.load(record)
    if not isinstance(record, RunRecord):
        raise InputError(f"rerun needs a RunRecord or the path of a saved one, not {record!r}")
    if not record.rerunnable:
        raise InputError(
            f"this record of {record.function} does not hold the function (it was over "
            f"{PAYLOAD_LIMIT // 2**20} MB pickled, or could not be pickled); run "
            "pool.map yourself with the recorded options: " + json.dumps(record.options)
        )
    fn, recorded_items = pickle.loads(base64.b64decode(record.payload))
    if items is None:
        if recorded_items is None:
            count = f"{record.items} " if record.items >= 0 else ""
            raise InputError(
                f"this record of {record.function} does not hold its {count}items (they were "
                "a generator, or over the size limit); pass them again as items="
            )
        items = recorded_items
    else:
        items = list(items)
        digest = items_hash(items)
        if record.items_hash and digest and digest != record.items_hash:
            raise InputError(
                "the items passed to rerun differ from the recorded ones (their hash does "
                "not match); pass the same items, or call pool.map for a new run"
            )
    options = {k: v for k, v in record.options.items() if k in RERUN_OPTIONS}
    if record.kind == "run":
        return pool.run(fn, items, **{k: v for k, v in options.items() if k != "seed"})
    return pool.map(fn, items, **options)


class RecordMaker:
    """Makes the records of one pool's maps: it knows the pool's parts a record describes.

    A record must not slow a map down: the client's versions are read once per process,
    node versions once per node (one out-of-band call to a slot of each node not asked
    before), and the function and items are pickled for a rerun only when the record is
    saved or rerun, not when the map ends.
    """

    def __init__(
        self,
        cluster: DaskCluster,
        *,
        provider: Provider,
        history: Callable[[], list[ScalingSample]],
    ) -> None:
        self._cluster = cluster
        self._provider = provider
        self._history = history
        self._known_versions: dict[str, dict[str, str]] = {}
        self.last: RunRecord | None = None

    def begin(
        self, kind: str, fn: Any, iterables: tuple[Iterable[Any], ...], options: Any
    ) -> RunRecord:
        """A record for a map starting now (finished by :meth:`end`)."""
        from .fingerprint import function_hash

        items = _count(iterables)
        record = RunRecord(
            kind=kind,
            function=fn if isinstance(fn, str) else _name(fn),
            code_hash=_command_hash(fn) if isinstance(fn, str) else function_hash(fn, strict=False),
            seed=options.seed,
            items=-1 if items is None else items,
            options={name: getattr(options, name) for name in RERUN_OPTIONS},
            started=_now(),
            client_versions=dict(_client_versions()),
        )
        provider = self._provider
        record.provider = provider.name
        try:
            record.pool_plan = provider.planned()
        except Exception as exc:  # a plan is description, never a reason to fail a map
            record.pool_plan = {"unavailable": str(exc)}
        self.last = record
        return record

    def end(
        self,
        record: RunRecord,
        fn: Any,
        iterables: tuple[Iterable[Any], ...],
        status: str,
        error: BaseException | None = None,
    ) -> None:
        """Finish ``record``: end time, status, scaling over the run, cost, node versions,
        and what a rerun needs."""
        record.ended = _now()
        record.keep_for_rerun(fn, iterables)
        record.status = status
        record.error = "" if error is None else f"{type(error).__name__}: {error}"
        started, ended = _parse(record.started), _parse(record.ended)
        history = self._history()
        # The sample in force when the run started, and every one taken during it.
        before = [s for s in history if s.time <= started][-1:]
        during = [s for s in history if started < s.time <= ended]
        samples = before + during
        record.scaling = [_sample_dict(s) for s in samples]
        prices = self._provider.prices()
        if prices is not None and samples:
            # Billed from the run's start to its end: the first sample moved to the start,
            # the last one repeated at the end (spend bills a sample until the next).
            billed = [replace(samples[0], time=started), *samples[1:]]
            billed.append(replace(samples[-1], time=ended))
            record.cost = spend(billed, prices)
            record.currency = prices.currency
        # Asking the nodes needs the scheduler: not after a map that failed for want of it
        # (a lost scheduler, a closed pool), whose own error must reach the user at once,
        # and never at the cost of that error.
        if not isinstance(error, PoolClosedError):
            with contextlib.suppress(Exception):
                record.node_versions = self.node_versions()

    def node_versions(self) -> dict[str, dict[str, str]]:
        """Package versions of each node serving now (asking only nodes new to this pool)."""
        slots = self._cluster.slots_by_node()
        first_slot = {node: joined[0][0] for node, joined in slots.items() if joined}
        new = {node: slot for node, slot in first_slot.items() if node not in self._known_versions}
        if new:
            # A node that left meanwhile: its versions stay unknown.
            with contextlib.suppress(Exception):
                answers = self._cluster.run_on_slots(list(new.values()), versions)
                for node, slot in new.items():
                    if slot in answers:
                        self._known_versions[node] = answers[slot]
        known = self._known_versions
        return {node: known[node] for node in first_slot if node in known}


@functools.cache
def _client_versions() -> dict[str, str]:
    """The client's :func:`~cloudmap.node.compat.versions`, read once (it reads package
    metadata from disk, a few milliseconds)."""
    return versions()


def items_hash(items: Iterable[Any]) -> str:
    """A hash of the items, as a list, pickled; "" when they cannot be pickled. As a list,
    so that a map over ``range(100)`` and the same items passed again as a list (or a
    range, or a tuple) hash the same."""
    try:
        blob = cloudpickle.dumps(list(items), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return ""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _payload(fn: Any, iterables: tuple[Iterable[Any], ...] | None) -> tuple[str, str]:
    """(base64 pickle of the function and items, hash of the items), within the limit;
    ``iterables`` None when the items were not kept."""
    items: Any = None
    if iterables is not None:
        items = iterables[0] if len(iterables) == 1 else list(zip(*iterables, strict=True))
    try:
        blob = cloudpickle.dumps((fn, items), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return "", ""
    digest = "" if items is None else items_hash(items)
    if len(blob) > PAYLOAD_LIMIT:
        try:  # the function alone may still fit: rerun then takes items=
            blob = cloudpickle.dumps((fn, None), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return "", digest
        if len(blob) > PAYLOAD_LIMIT:
            return "", digest
    return base64.b64encode(blob).decode("ascii"), digest


def _sized(iterable: Iterable[Any]) -> bool:
    """Inputs a record may keep: sequences that iterating does not consume."""
    return hasattr(iterable, "__len__") and hasattr(iterable, "__getitem__")


def _small(iterables: tuple[Any, ...]) -> bool:
    """Whether the items are likely to pickle within PAYLOAD_LIMIT (from the first ones),
    so that a huge input is not pickled only to be thrown away."""
    for iterable in iterables:
        if isinstance(iterable, range) or len(iterable) == 0:
            continue
        if len(iterable) * item_bytes(iterable[0]) > PAYLOAD_LIMIT:
            return False
    return True


def _count(iterables: tuple[Iterable[Any], ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


def _name(fn: Any) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    module = getattr(inner, "__module__", None) or ""
    name = getattr(inner, "__qualname__", None) or type(inner).__name__
    return f"{module}.{name}" if module else name


def _command_hash(command: str) -> str:
    return hashlib.blake2b(command.encode(), digest_size=16).hexdigest()


def _sample_dict(sample: ScalingSample) -> dict[str, Any]:
    data = asdict(sample)
    data["time"] = sample.time.isoformat()
    return data


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text)
