"""Multi-instance MPI runs on a pool: Batch's multi-instance tasks, in Python terms.

A run takes k whole nodes from the pool (:mod:`cloudmap.gang`), runs the coordination step
on each, then launches the ranks from the primary node with MPICH's ``mpiexec``
(:mod:`cloudmap.node.mpi_launch`), and gives the nodes back whatever happens. Python mode
calls ``fn(comm, *args, **kwargs)`` on every rank and returns the values in rank order;
command mode runs any MPI program and returns its exit code and each rank's output.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .cluster import DaskCluster
from .errors import (
    InputError,
    MpiError,
    MpiTimeoutError,
    MpiUnavailableError,
    PoolClosedError,
    SerializationError,
)
from .gang import GangScheduler
from .node.mpi_launch import MpiSpec, RunNode, coordinate, launch, stop_run
from .progress import ProgressCounts, make_reporter
from .validation import check_int, check_positive

#: Exit statuses that mean "killed because another rank failed", not "this rank failed".
_KILLED_STATUSES = frozenset({-9, -15, 9, 15, 137, 143})
#: Seconds between checks that the nodes of a running MPI run are still there.
LOST_NODE_CHECK = 0.5
#: Seconds to wait for the primary node to confirm it stopped an abandoned run.
KILL_WAIT = 10.0
MPI_EXTRA_HINT = "pip install 'cloudmap[mpi]' (mpi4py and the mpich wheel) where the nodes run"


@dataclass(frozen=True)
class MpiResult:
    """What an MPI run left: the launcher's exit code and every rank's output, in rank order.

    ``nodes`` are the node ids the run held, the primary first.
    """

    exit_code: int
    stdout: list[str]
    stderr: list[str]
    nodes: list[str]

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class RunOptions:
    nodes: int = 1
    ranks_per_node: int = 1
    timeout: float | None = None
    coordination: str | Callable[[], Any] | None = None
    env: dict[str, str] | None = None

    def checked(self) -> RunOptions:
        check_int("nodes", self.nodes, minimum=1)
        check_int("ranks_per_node", self.ranks_per_node, minimum=1)
        if self.timeout is not None:
            check_positive("timeout", self.timeout)
        if self.coordination is not None and not (
            isinstance(self.coordination, str) or callable(self.coordination)
        ):
            raise InputError(
                f"coordination={self.coordination!r} is neither a shell command nor a callable"
            )
        return self


class MpiRunner:
    """Runs MPI jobs on whole nodes leased from the pool."""

    def __init__(
        self, cluster: DaskCluster, gang: GangScheduler, is_closed: Callable[[], bool]
    ) -> None:
        self._cluster = cluster
        self._gang = gang
        self._is_closed = is_closed

    def run(
        self, options: RunOptions, *, call: bytes | None = None, command: str | None = None
    ) -> tuple[MpiResult, list[Any] | None]:
        """Lease, coordinate, launch, collect, release. Raises MpiError on any failure."""
        options = options.checked()
        coordination = _coordination_payload(options.coordination)
        lease = self._gang.acquire(options.nodes)
        try:
            spec = MpiSpec(
                run_id=uuid.uuid4().hex[:12],
                nodes=tuple(_run_node(node) for node in lease.nodes),
                ranks_per_node=options.ranks_per_node,
                command=command,
                call=call,
                coordination=coordination,
                timeout=options.timeout,
                env={str(k): str(v) for k, v in (options.env or {}).items()},
            )
            _check_one_host(spec)
            prepared = self._coordinate(spec)
            return _interpret(spec, self._launch(spec, prepared))
        except Exception as exc:
            if self._is_closed():
                raise PoolClosedError("the pool was closed while this MPI run was running") from exc
            raise
        finally:
            self._gang.release(lease)

    def _launch(
        self, spec: MpiSpec, prepared: tuple[list[str], list[dict[str, str]]]
    ) -> dict[str, Any]:
        """Run the ranks from the primary node; stop at once if a node of the run is lost
        (preempted, removed), instead of waiting for Dask to give up on it."""
        primary = spec.nodes[0].worker
        threads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cloudmap-mpi")
        running = threads.submit(self._cluster.run_on, primary, launch, spec, *prepared)
        threads.shutdown(wait=False)
        ids = [node.id for node in spec.nodes]
        lost: list[str] = []
        try:
            while True:
                try:
                    outcome: dict[str, Any] = running.result(timeout=LOST_NODE_CHECK)
                    return outcome
                except concurrent.futures.TimeoutError:
                    lost = self._gang.lost(ids)
                    if lost:
                        raise _lost_node_error(lost[0], ids) from None
                except Exception as exc:  # the primary's slot went away under the run
                    lost = self._gang.lost(ids)
                    if lost:
                        raise _lost_node_error(lost[0], ids) from exc
                    raise
        except BaseException:
            if ids[0] not in lost:  # Ctrl-C, or another node lost: stop what still runs
                stopper = threading.Thread(target=self._stop_quietly, args=(primary, spec.run_id))
                stopper.start()
                stopper.join(timeout=KILL_WAIT)
            raise

    def _stop_quietly(self, primary: str, run_id: str) -> None:
        with contextlib.suppress(Exception):
            self._cluster.run_on(primary, stop_run, run_id)

    def _coordinate(self, spec: MpiSpec) -> tuple[list[str], list[dict[str, str]]]:
        """Run the coordination step on every node; return each node's run directory and
        the node's own variables for its ranks."""
        workers = [node.worker for node in spec.nodes]
        with concurrent.futures.ThreadPoolExecutor(len(workers)) as threads:
            outcomes = list(
                threads.map(
                    lambda pair: self._cluster.run_on(pair[1], coordinate, spec, pair[0]),
                    enumerate(workers),
                )
            )
        for node, outcome in zip(spec.nodes, outcomes, strict=True):
            if outcome["missing"]:
                raise MpiUnavailableError(
                    f"MPI cannot run on {node.id}: {outcome['missing']}; {MPI_EXTRA_HINT}"
                )
            if outcome.get("exit_code"):
                raise MpiError(
                    f"the coordination step failed on {node.id} with exit code "
                    f"{outcome['exit_code']}; no rank was started\n--- stderr ---\n"
                    f"{outcome['stderr'][-2000:]}",
                    node=node.id,
                )
        directories = [str(outcome["directory"]) for outcome in outcomes]
        return directories, [dict(outcome["node_env"]) for outcome in outcomes]

    def command(self, command: str, options: RunOptions, *, check: bool) -> MpiResult:
        """``pool.mpi_command``: run a program on the ranks; a non-zero exit raises, unless
        ``check`` is False (then the result tells it; a timeout always raises)."""
        if not isinstance(command, str) or not command.strip():
            raise InputError(f"command={command!r} is not valid: pass a shell command string")
        try:
            result, _ = self.run(options, command=command)
        except MpiError as exc:
            if check or isinstance(exc, MpiTimeoutError) or exc.result is None:
                raise
            assert isinstance(exc.result, MpiResult)
            return exc.result
        return result

    def map(
        self,
        fn: Callable[..., Any],
        params: Iterable[Any],
        options: RunOptions,
        *,
        runs_at_once: int,
        root_only: bool,
        progress: Any,
    ) -> list[Any]:
        """One Python-mode run per parameter, as many at once as the pool holds."""
        params = list(params)
        counts = ProgressCounts(total=len(params))
        reporter = make_reporter(progress)
        if reporter is not None:
            reporter.start(counts, "mpi_map")
        results: dict[int, Any] = {}
        first_error: MpiError | None = None
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, runs_at_once)) as threads:
                futures = {
                    threads.submit(self.call, fn, (param,), {}, options, root_only): index
                    for index, param in enumerate(params)
                }
                remaining = len(futures)
                counts.in_flight = counts.running = min(remaining, runs_at_once)
                for future in concurrent.futures.as_completed(futures):
                    index = futures[future]
                    remaining -= 1
                    counts.in_flight = counts.running = min(remaining, runs_at_once)
                    try:
                        results[index] = future.result()
                        counts.done += 1
                    except MpiError as exc:
                        counts.add_failure(exc)
                        if first_error is None:
                            first_error = exc
                            for other in futures:
                                other.cancel()
                    except concurrent.futures.CancelledError:
                        pass
                    if reporter is not None:
                        reporter.update(counts)
        finally:
            if reporter is not None:
                reporter.close(counts)
        if first_error is not None:
            first_error.results = results
            raise first_error
        return [results[i] for i in range(len(params))]

    def call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: RunOptions,
        root_only: bool,
    ) -> Any:
        """Python mode: ``fn(comm, *args, **kwargs)`` on every rank; the ranks' values."""
        if not callable(fn):
            raise InputError(f"pool.mpi needs a function, got {type(fn).__name__}")
        try:
            call = cloudpickle.dumps((fn, args, kwargs, root_only))
        except Exception as exc:
            raise SerializationError(
                f"the MPI function or its arguments cannot be pickled ({exc}); pass a "
                "module-level function and picklable arguments"
            ) from exc
        _, values = self.run(options, call=call)
        assert values is not None
        return values[0] if root_only else values


def _lost_node_error(node: str, nodes: list[str]) -> MpiError:
    return MpiError(
        f"node {node} of the MPI run on {', '.join(nodes)} was lost (preempted, removed or "
        "dead) while the ranks ran; every rank was stopped. Run it again.",
        node=node,
    )


def _check_one_host(spec: MpiSpec) -> None:
    """Refuse a run across machines rather than misplace it: the launcher is MPICH's fork
    launcher, which starts every rank on the primary node's host."""
    hosts = sorted({node.host for node in spec.nodes})
    if len(hosts) > 1:
        raise MpiUnavailableError(
            f"this MPI run spans {len(hosts)} hosts ({', '.join(hosts)}); cloudmap starts "
            "every rank with MPICH's fork launcher on the first node's host, so runs across "
            "machines are not supported yet. Use nodes=1 with ranks_per_node up to the "
            "node's cores."
        )


def _run_node(node: Any) -> RunNode:
    worker = node.workers[0]
    host = worker.split("://", 1)[-1].rsplit(":", 1)[0]
    return RunNode(node.id, host, worker)


def _coordination_payload(coordination: str | Callable[[], Any] | None) -> str | bytes | None:
    if coordination is None or isinstance(coordination, str):
        return coordination
    try:
        return bytes(cloudpickle.dumps(coordination))
    except Exception as exc:
        raise SerializationError(
            f"coordination={coordination!r} cannot be pickled ({exc}); pass a module-level "
            "function or a shell command"
        ) from exc


def _interpret(spec: MpiSpec, outcome: dict[str, Any]) -> tuple[MpiResult, Any]:
    exit_code = outcome["exit_code"]
    result = MpiResult(
        exit_code=0 if exit_code is None else int(exit_code),
        stdout=list(outcome["stdout"]),
        stderr=list(outcome["stderr"]),
        nodes=[node.id for node in spec.nodes],
    )
    node_of_rank = [node.id for node in spec.nodes for _ in range(spec.ranks_per_node)]
    if outcome["timed_out"]:
        raise MpiTimeoutError(
            f"the MPI run on {', '.join(result.nodes)} ran longer than timeout="
            f"{spec.timeout:g} s; every rank was killed and the nodes returned to the pool",
            result=result,
        )
    errors: dict[int, str] = outcome["errors"]
    if errors:
        rank = min(errors)
        blob, text = cloudpickle.loads(base64.b64decode(errors[rank]))
        exception = cloudpickle.loads(blob)
        raise MpiError(
            f"rank {rank} on {node_of_rank[rank]} raised {type(exception).__name__}: "
            f"{exception}; every rank was stopped\n\nRemote traceback:\n{text.rstrip()}",
            rank=rank,
            node=node_of_rank[rank],
            exception=exception,
            remote_traceback=text,
            result=result,
        )
    if result.exit_code != 0 or (spec.call is not None and outcome["result"] is None):
        failed = _failed_rank(outcome["exits"])
        if failed is None:
            where, code, tail = "a rank", result.exit_code, str(outcome["launcher"])
        else:
            where = f"rank {failed} on {node_of_rank[failed]}"
            code, tail = outcome["exits"][failed], result.stderr[failed]
        message = f"{where} exited with status {code}; every rank was stopped"
        if tail.strip():
            message += f"\n--- stderr (end) ---\n{tail[-2000:].rstrip()}"
        raise MpiError(
            message,
            rank=failed,
            node=None if failed is None else node_of_rank[failed],
            result=result,
        )
    values = None
    if spec.call is not None:
        values = [cloudpickle.loads(blob) for blob in cloudpickle.loads(outcome["result"])]
    return result, values


def _failed_rank(exits: dict[int, int]) -> int | None:
    """The rank that failed by itself: non-zero, and not merely killed for another's sake."""
    own = sorted(rank for rank, code in exits.items() if code and code not in _KILLED_STATUSES)
    if own:
        return own[0]
    failed = sorted(rank for rank, code in exits.items() if code)
    return failed[0] if failed else None
