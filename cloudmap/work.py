"""The pool's work: ``map``, ``imap``, ``run`` and ``submit`` made into map engines and futures.

Each map (one Batch job) gets a fresh :class:`~cloudmap.engine.MapEngine`; this module
wraps the function for what the call asks (staged files, a job's preparation), keeps the
engines that are running (their unsent input is autoscale's backlog), and runs a job's
release on the nodes. Jobs call it, and executors see it through
:class:`~cloudmap.futures.ExecutorBackend` (futures.py cannot import this module, which
imports it); neither sees the Pool.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

from .cache import CachedMapEngine, ResultCache
from .cluster import DaskCluster
from .commands import check_command
from .engine import SKIPPED, MapEngine
from .errors import InputError, TaskError
from .futures import Future
from .node.command_task import CommandTask
from .node.job_steps import JobCall, JobSteps, release_node
from .node.staged_call import StagedCall
from .nodes import NodeInfo
from .options import MapOptions
from .progress import make_reporter
from .record import MapResult, RecordMaker, RunRecord
from .runs import MapRun
from .staging import as_inputs, as_outputs

logger = logging.getLogger(__name__)


class Work:
    """Runs the pool's maps, commands and submitted calls on its cluster.

    ``slots`` is how many slots to plan batches for (it raises
    :class:`~cloudmap.NoNodesError` when no node is left or on its way); ``nodes`` lists the
    pool's nodes; ``is_closed`` tells a running map that the pool was closed under it;
    ``records`` makes each map's :class:`~cloudmap.RunRecord`.
    """

    def __init__(
        self,
        cluster: DaskCluster,
        *,
        slots: Callable[[], int],
        nodes: Callable[[], list[NodeInfo]],
        is_closed: Callable[[], bool],
        records: RecordMaker,
    ) -> None:
        self._cluster = cluster
        self._slots = slots
        self._nodes = nodes
        self._is_closed = is_closed
        self._records = records
        self._engines: weakref.WeakSet[MapEngine] = weakref.WeakSet()

    @property
    def last_record(self) -> RunRecord | None:
        """The record of the map that started last (it may still run)."""
        return self._records.last

    def backlog_tasks(self) -> int:
        """Tasks' worth of input the running maps have not sent yet (for autoscale)."""
        return sum(engine.backlog_tasks() for engine in list(self._engines))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        self._slots()
        return Future(self._cluster, fn, args, kwargs)

    def map_all(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        label: str = "map",
        job: JobSteps | None = None,
        staged: bool = False,
        outputs_dir: str = "",
        recorded: Any = None,
    ) -> MapResult:
        """Every result, in input order (``map``): on a failure that is raised, the results
        that finished travel with the error. ``recorded`` is what the run record names as
        the function (a command's text; by default ``fn``)."""
        engine = self._engine(
            fn,
            iterables,
            options,
            ordered=True,
            label=label,
            staged=staged,
            outputs_dir=outputs_dir,
            job=job,
        )
        finish = self._recording(label, recorded or fn, iterables, options)
        results = MapResult()
        try:
            engine.start()
            for _, values in engine.chunks():
                results.extend(values)
        except BaseException as exc:
            if isinstance(exc, (TaskError, InputError)):
                # Chunks arrive in input order, so results[i] is item i's value.
                done = {i: v for i, v in enumerate(results) if v is not SKIPPED}
                exc.results = {**done, **exc.results}
            finish("cancelled" if isinstance(exc, KeyboardInterrupt) else "failed", exc)
            raise
        if options.on_error == "skip":
            results[:] = [value for value in results if value is not SKIPPED]
        results.record = finish("finished", None)
        return results

    def map_async(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        label: str = "map",
        staged: bool = False,
        outputs_dir: str = "",
        recorded: Any = None,
    ) -> MapRun:
        """``map`` in the background: a :class:`~cloudmap.runs.MapRun` returned once the
        first tasks are sent (bad input raises here, before any work)."""
        reporter = make_reporter(options.progress)
        options = replace(options, progress=False if reporter is None else reporter)
        engine = self._engine(
            fn,
            iterables,
            options,
            ordered=False,  # results_so_far() sees every item as soon as it is back
            label=label,
            staged=staged,
            outputs_dir=outputs_dir,
        )
        finish = self._recording(label, recorded or fn, iterables, options)
        try:
            engine.start()
        except BaseException as exc:
            finish("failed", exc)
            raise
        return MapRun(
            engine,
            progress=reporter,
            skip_failed=options.on_error == "skip",
            finish=finish,
            label=label,
        )

    def _recording(
        self, label: str, described: Any, iterables: tuple[Iterable[Any], ...], options: MapOptions
    ) -> Callable[[str, BaseException | None], RunRecord]:
        """Begin the run record of a map; the call returned ends it (status, error).

        A record that cannot be finished is logged and left as it is: it must never keep a
        map's results or its own error from the caller (nor a MapRun from ending)."""
        record = self._records.begin(label, described, iterables, options)

        def finish(status: str, error: BaseException | None) -> RunRecord:
            try:
                self._records.end(record, described, iterables, status, error)
            except Exception:
                logger.warning(
                    "cloudmap: the run record of a %s was not finished", label, exc_info=True
                )
            return record

        return finish

    def imap(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        ordered: bool,
        deadline: float | None = None,
        job: JobSteps | None = None,
    ) -> Iterator[Any]:
        """Results as they may be handed out; work starts at the call."""
        label = "imap" if ordered else "imap-unordered"
        engine = self._engine(fn, iterables, options, ordered=ordered, label=label, job=job)
        engine.start()
        return _values(engine, deadline)

    def run(
        self,
        command: str,
        items: Iterable[Any],
        options: MapOptions,
        *,
        job: JobSteps | None = None,
    ) -> MapResult:
        """``pool.run``: a staged map of a shell command."""
        return self.map_all(
            _command_task(command, options),
            (items,),
            options,
            label="run",
            staged=True,
            outputs_dir="outputs",
            job=job,
            recorded=command,
        )

    def run_async(self, command: str, items: Iterable[Any], options: MapOptions) -> MapRun:
        """``pool.run_async``: :meth:`run` in the background."""
        return self.map_async(
            _command_task(command, options),
            (items,),
            options,
            label="run",
            staged=True,
            outputs_dir="outputs",
            recorded=command,
        )

    def release_job(self, steps: JobSteps) -> dict[str, str]:
        """Run a job's release on every node with a connected slot; failures by node."""
        failures: dict[str, str] = {}
        for node in self._nodes():
            if not node.workers:
                continue
            try:
                error = self._cluster.run_on(node.workers[0], release_node, steps)
            except Exception:  # the node went away meanwhile: nothing left to release
                continue
            if error:
                failures[node.id] = str(error)
        return failures

    def _engine(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: MapOptions,
        *,
        ordered: bool,
        label: str,
        staged: bool = False,
        outputs_dir: str = "",
        job: JobSteps | None = None,
    ) -> MapEngine:
        self._slots()
        options = options.checked(fn)
        cache = ResultCache.for_map(fn, len(iterables), options, staged=staged)
        if staged or options.inputs or options.outputs:
            fn = StagedCall(
                fn,
                star=len(iterables) > 1,
                inputs=options.inputs,
                outputs=options.outputs,
                job=f"{label}-{uuid.uuid4().hex[:8]}",
                storage_options=dict(options.storage_options or {}),
                outputs_dir=outputs_dir,
            )
        if job is not None:  # outermost: the node is prepared before inputs download
            fn = JobCall(fn, job)
        engine = _engine_class(cache)(
            self._cluster,
            fn,
            iterables,
            options,
            slots=self._slots,
            is_closed=self._is_closed,
            ordered=ordered,
            label=label,
        )
        self._engines.add(engine)
        return engine


def _engine_class(cache: ResultCache | None) -> Callable[..., MapEngine]:
    """A map engine, or with ``cache=`` one that hands out the cached results and runs
    only the missing items (see :mod:`cloudmap.cache`)."""
    return MapEngine if cache is None else partial(CachedMapEngine, cache=cache)


def _command_task(command: str, options: MapOptions) -> CommandTask:
    """The task that runs ``command`` for an item, checked against the map's files."""
    return CommandTask(
        check_command(
            command,
            has_inputs=bool(as_inputs(options.inputs)),
            has_outputs=bool(as_outputs(options.outputs)),
        )
    )


def _values(engine: MapEngine, deadline: float | None) -> Iterator[Any]:
    for _, values in engine.chunks(deadline):
        for value in values:
            if value is not SKIPPED:
                yield value
