"""The pool's work: ``map``, ``imap``, ``run`` and ``submit`` made into map engines and futures.

Each map (one Batch job) gets a fresh :class:`~cloudmap.engine.MapEngine`; this module
wraps the function for what the call asks (staged files, a job's preparation), keeps the
engines that are running (their unsent input is autoscale's backlog), and runs a job's
release on the nodes. Jobs call it, and executors see it through
:class:`~cloudmap.futures.ExecutorBackend` (futures.py cannot import this module, which
imports it); neither sees the Pool.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
from .staging import as_inputs, as_outputs


class Work:
    """Runs the pool's maps, commands and submitted calls on its cluster.

    ``slots`` is how many slots to plan batches for (it raises
    :class:`~cloudmap.NoNodesError` when no node is left or on its way); ``nodes`` lists the
    pool's nodes; ``is_closed`` tells a running map that the pool was closed under it.
    """

    def __init__(
        self,
        cluster: DaskCluster,
        *,
        slots: Callable[[], int],
        nodes: Callable[[], list[NodeInfo]],
        is_closed: Callable[[], bool],
    ) -> None:
        self._cluster = cluster
        self._slots = slots
        self._nodes = nodes
        self._is_closed = is_closed
        self._engines: weakref.WeakSet[MapEngine] = weakref.WeakSet()

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
    ) -> list[Any]:
        """Every result, in input order (``map``): on a failure that is raised, the results
        that finished travel with the error."""
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
        results: list[Any] = []
        try:
            engine.start()
            for _, values in engine.chunks():
                results.extend(values)
        except (TaskError, InputError) as exc:
            # Chunks arrive in input order, so results[i] is item i's value.
            done = {i: v for i, v in enumerate(results) if v is not SKIPPED}
            exc.results = {**done, **exc.results}
            raise
        if options.on_error == "skip":
            results = [value for value in results if value is not SKIPPED]
        return results

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
    ) -> list[Any]:
        """``pool.run``: a staged map of a shell command."""
        task = CommandTask(
            check_command(
                command,
                has_inputs=bool(as_inputs(options.inputs)),
                has_outputs=bool(as_outputs(options.outputs)),
            )
        )
        return self.map_all(
            task, (items,), options, label="run", staged=True, outputs_dir="outputs", job=job
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
        engine = MapEngine(
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


def _values(engine: MapEngine, deadline: float | None) -> Iterator[Any]:
    for _, values in engine.chunks(deadline):
        for value in values:
            if value is not SKIPPED:
                yield value
