"""Multi-instance MPI runs on a pool: Batch's multi-instance tasks, in Python terms.

A run takes k whole nodes from the pool (:mod:`cloudmap.gang`), runs the coordination step
on each, starts MPICH's ``mpiexec`` on the primary node (:mod:`cloudmap.node.mpi_launch`),
hands each node the command line of its hydra proxy, which starts that node's ranks
(:mod:`cloudmap.node.mpi_proxy`), and gives the nodes back whatever happens. Everything
goes through the slots' ``Client.run``: the client connects to nothing new and the nodes
need no ssh, only TCP between each other. Python mode
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
from .loops import poll_until
from .node.mpi_launch import coordinate, start_launcher, stop_run, watch_launcher
from .node.mpi_proxy import end_proxy, start_proxy
from .node.mpi_spec import MpiSpec, RunNode
from .progress import ProgressCounts, make_reporter
from .validation import check_int, check_positive

#: Exit statuses that mean "killed because another rank failed", not "this rank failed".
_KILLED_STATUSES = frozenset({-9, -15, 9, 15, 137, 143})
#: Seconds between checks that the nodes of a running MPI run are still there.
LOST_NODE_CHECK = 0.5
#: Seconds to wait for the pool to see a node lost, after a run failed without a reason.
LOST_GRACE = 3.0
#: Seconds to wait for the nodes to confirm they stopped what was left of a run.
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
            directories = self._coordinate(spec)
            return _interpret(spec, self._launch(spec, directories))
        except Exception as exc:
            if self._is_closed():
                raise PoolClosedError("the pool was closed while this MPI run was running") from exc
            raise
        finally:
            self._gang.release(lease)

    def _launch(self, spec: MpiSpec, directories: list[str]) -> dict[str, Any]:
        """Start the run on its nodes and wait for it; stop at once if a node of the run is
        lost (preempted, removed), instead of waiting for Dask to give up on it. However it
        ends, every node still there is then told to kill what is left of the run."""
        threads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cloudmap-mpi")
        running = threads.submit(self._start_and_wait, spec, directories)
        threads.shutdown(wait=False)
        ids = [node.id for node in spec.nodes]
        lost: list[str] = []
        try:
            while True:
                try:
                    outcome: dict[str, Any] = running.result(timeout=LOST_NODE_CHECK)
                    lost = self._lost_under(outcome, ids)
                    if lost:
                        raise _lost_node_error(lost[0], ids)
                    return outcome
                except concurrent.futures.TimeoutError:
                    lost = self._gang.lost(ids)
                    if lost:
                        raise _lost_node_error(lost[0], ids) from None
                except Exception as exc:  # a slot of the run went away under it
                    lost = self._gang.lost(ids)
                    if lost:
                        raise _lost_node_error(lost[0], ids) from exc
                    raise
        finally:  # also on Ctrl-C
            stopper = threading.Thread(target=self._stop, args=(spec, lost), daemon=True)
            stopper.start()
            stopper.join(timeout=KILL_WAIT)

    def _lost_under(self, outcome: dict[str, Any], ids: list[str]) -> list[str]:
        """The nodes lost under a run that failed for no reason its ranks gave (no error, no
        rank's own exit status): ``mpiexec`` ends as soon as a node's proxy drops its
        connection, often before the pool has noticed that the node is gone, so that is
        waited for a little."""
        unexplained = (
            outcome["exit_code"]
            and not outcome["timed_out"]
            and not outcome["errors"]
            and _failed_rank(outcome["exits"]) is None
        )
        if not unexplained:
            return []
        return poll_until(lambda: self._gang.lost(ids), LOST_GRACE)

    def _start_and_wait(self, spec: MpiSpec, directories: list[str]) -> dict[str, Any]:
        """``mpiexec`` on the primary prints one proxy command line per node; each node's
        slot starts its own and confirms it connected; then the primary waits for the run."""
        primary = spec.nodes[0]
        started = self._cluster.run_on(primary.worker, start_launcher, spec, directories)
        if "error" in started:
            raise MpiError(
                f"mpiexec could not start the run on the primary node {primary.id}; no rank "
                f"was started\n{started['error']}",
                node=primary.id,
            )
        lines = started["lines"]
        problems = self._on_every_node(
            spec,
            lambda index, node: self._cluster.run_on(
                node.worker, start_proxy, spec, index, lines[index], directories[index]
            ),
        )
        for node, problem in zip(spec.nodes, problems, strict=True):
            if problem:
                raise MpiError(
                    f"node {node.id} could not start its MPI ranks; the run was stopped on "
                    f"every node\n{problem}",
                    node=node.id,
                )
        outcome: dict[str, Any] = self._cluster.run_on(
            primary.worker, watch_launcher, spec, directories
        )
        return outcome

    def _stop(self, spec: MpiSpec, lost: list[str]) -> None:
        """SIGKILL ``mpiexec`` on the primary and every proxy and rank of the run on every
        node not lost (a lost node's processes went with it). After a run that ended
        well there is nothing left to kill, and each node says so at once."""

        def stop(index: int, node: RunNode) -> None:
            if node.id in lost:
                return
            with contextlib.suppress(Exception):
                if index == 0:
                    self._cluster.run_on(node.worker, stop_run, spec.run_id)
                self._cluster.run_on(node.worker, end_proxy, spec.run_id)

        self._on_every_node(spec, stop)

    def _on_every_node(self, spec: MpiSpec, action: Callable[[int, RunNode], Any]) -> list[Any]:
        """``action(index, node)`` for every node of the run at once; the results in node
        order."""
        with concurrent.futures.ThreadPoolExecutor(len(spec.nodes)) as threads:
            return list(threads.map(action, range(len(spec.nodes)), spec.nodes))

    def _coordinate(self, spec: MpiSpec) -> list[str]:
        """Run the coordination step on every node; return each node's run directory."""
        outcomes = self._on_every_node(
            spec, lambda index, node: self._cluster.run_on(node.worker, coordinate, spec, index)
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
        return [str(outcome["directory"]) for outcome in outcomes]

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
