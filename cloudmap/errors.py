"""The exceptions cloudmap raises: each says what went wrong and what to do next."""

from __future__ import annotations

from typing import Any


class CloudmapError(Exception):
    """Base class of every error cloudmap raises itself."""


class PoolClosedError(CloudmapError, RuntimeError):
    """The pool was used after ``close()`` (or after its ``with`` block ended)."""


class SchedulerLostError(PoolClosedError):
    """The pool's scheduler is gone for good: the node hosting it was lost, or the client
    was cut off from it for longer than it may be. The pool cannot go on; results that
    arrived before are in ``results`` (by item index) where a map raised it."""

    def __init__(self, message: str, results: dict[int, Any] | None = None) -> None:
        super().__init__(message)
        self.results = results or {}


class PoolStartError(CloudmapError, RuntimeError):
    """No node of a new pool became ready in time; the pool left nothing running.

    ``nodes`` holds the provider's last view of every node, including the start task's
    exit code, stdout and stderr, so the reason is visible without digging in files.
    """

    def __init__(self, message: str, nodes: list[Any] | None = None) -> None:
        super().__init__(message)
        self.nodes = list(nodes or [])


class NoNodesError(CloudmapError, RuntimeError):
    """Work was sent to a pool that has no nodes and none on the way."""


class UnknownProviderError(CloudmapError, ValueError):
    """The provider name is not registered."""


class InputError(CloudmapError, ValueError):
    """The arguments of a map or submit call cannot be used as given.

    ``results`` maps item index to value for every item finished before the problem was
    found, so nothing computed is lost.
    """

    def __init__(self, message: str, results: dict[int, Any] | None = None) -> None:
        super().__init__(message)
        self.results = dict(results or {})


class SerializationError(InputError, TypeError):
    """A function, argument or item could not be pickled to send to the nodes."""


class RemoteException(CloudmapError):
    """Stands in for a remote exception that could not be sent back as itself."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, str(self).split(": ", 1)[-1]))


#: Lines of a failed item's output that its TaskError's message shows (all are in .output).
OUTPUT_LINES_SHOWN = 10


class TaskError(CloudmapError):
    """An item failed on the pool after all its attempts.

    Attributes
    ----------
    index : int
        Position of the item in the input (0 for ``submit``).
    item : object
        The item itself, when it was still held by the client.
    node, worker : str or None
        Where the last attempt ran.
    attempts : int
        How many times the item was tried and failed (retries + 1 when all were used).
    preemptions : int
        How many times the item was sent again because its node was preempted or removed
        while it ran; those attempts do not count in ``attempts`` or spend ``retries``.
    exception : BaseException
        The exception the function raised (or a :class:`RemoteException` stand-in).
    remote_traceback : str
        The traceback as printed on the node.
    results : dict
        With ``on_error="raise"``: every result finished before the failure, by index.
    output : str
        What the item printed and logged in its last attempt (its last 64 KB), when the map
        captures output (``capture_output=True``, the default); the message shows the last
        lines. Everything is in the slot's log too.
    """

    def __init__(
        self,
        index: int,
        *,
        exception: BaseException,
        remote_traceback: str = "",
        node: str | None = None,
        worker: str | None = None,
        attempts: int = 1,
        preemptions: int = 0,
        item: Any = None,
        output: str = "",
    ) -> None:
        self.index = index
        self.output = output
        self.exception = exception
        self.remote_traceback = remote_traceback
        self.node = node
        self.worker = worker
        self.attempts = attempts
        self.preemptions = preemptions
        self.item = item
        self.results: dict[int, Any] = {}
        where = f" on {worker}" if worker else ""
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        if preemptions:
            tries += f" (and {preemptions} lost to preemption, not counted)"
        message = (
            f"item {index} failed{where} after {tries}: {type(exception).__name__}: {exception}"
        )
        if remote_traceback:
            message += "\n\nRemote traceback:\n" + remote_traceback.rstrip()
        if output.strip():
            lines = output.rstrip("\n").split("\n")
            shown = lines[-OUTPUT_LINES_SHOWN:]
            cut = "" if len(shown) == len(lines) else f", last {len(shown)} of {len(lines)}"
            message += f"\n\nThe item's output (.output{cut}):\n" + "\n".join(shown)
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_task_error, (self.index, self.__dict__.copy()))


def _rebuild_task_error(index: int, state: dict[str, Any]) -> TaskError:
    error = TaskError(
        index,
        exception=state["exception"],
        remote_traceback=state["remote_traceback"],
        node=state["node"],
        worker=state["worker"],
        attempts=state["attempts"],
        preemptions=state.get("preemptions", 0),
        item=state["item"],
        output=state.get("output", ""),
    )
    error.results = state.get("results", {})
    return error


class TaskTimeoutError(CloudmapError, TimeoutError):
    """One attempt of an item ran longer than the map's ``timeout=``; its slot was restarted."""


class WorkerLostError(CloudmapError, RuntimeError):
    """The slot process running an item died (crash, out of memory, ``os._exit``...)."""


class MpiUnavailableError(CloudmapError):
    """MPI runs need mpi4py and an MPI launcher on the nodes: the ``cloudmap[mpi]`` extra."""


class MpiError(CloudmapError):
    """An MPI run failed: a rank raised or exited non-zero, or the run timed out.

    Attributes
    ----------
    rank : int or None
        The rank that failed first, when it is known.
    node : str or None
        The node that rank ran on.
    exception : BaseException or None
        What the rank's function raised (Python mode).
    remote_traceback : str
        The rank's traceback (Python mode).
    result : MpiResult or None
        Exit code and every rank's stdout and stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        node: str | None = None,
        exception: BaseException | None = None,
        remote_traceback: str = "",
        result: Any = None,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.node = node
        self.exception = exception
        self.remote_traceback = remote_traceback
        self.result = result
        self.results: dict[int, Any] = {}  # mpi_map: the runs that finished, by position


class MpiTimeoutError(MpiError, TimeoutError):
    """An MPI run took longer than its ``timeout=``; every rank was killed."""


class StagingError(CloudmapError, RuntimeError):
    """An item's input could not be downloaded or its output uploaded; names item and URL."""


class CommandError(CloudmapError, RuntimeError):
    """A command-line task (``pool.run``) exited non-zero; carries the end of its stderr."""

    def __init__(self, message: str, exit_code: int = 1, stderr: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr = stderr

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommandError, (str(self), self.exit_code, self.stderr))


class JobPreparationError(CloudmapError, RuntimeError):
    """A job's preparation failed on a node; the job's tasks there fail with this."""


class JobReleaseError(CloudmapError):
    """A job's release failed on some nodes (``failures``: node id -> message)."""

    def __init__(self, message: str, failures: dict[str, str]) -> None:
        super().__init__(message)
        self.failures = failures


class SharedDataError(CloudmapError, RuntimeError):
    """A task needed a shared object that its pool's scheduler does not hold: it was shared
    with another pool, or the handle was unpickled outside the pool's tasks."""
