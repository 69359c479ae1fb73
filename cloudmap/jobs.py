"""Jobs with preparation and release tasks, as Batch's job preparation and release.

``with pool.job(prepare=..., release=...) as job: job.map(...)`` runs ``prepare`` (a shell
command or a callable) once on each node, before that node's first task of the job, and
``release`` on every node that ran it when the ``with`` block ends, failure included. On
the node, the job has a directory ``shared/jobs/<job id>`` (``CLOUDMAP_JOB_DIR``) where both
run, with their output kept as ``prepare-stdout.txt`` and so on. The slots of a node agree
through a lock file there, so ``prepare`` runs once per node however many slots it has.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle

from .errors import InputError, JobPreparationError, JobReleaseError

if TYPE_CHECKING:
    from .pool import Pool

JobStep = str | Callable[[], Any] | None
_PREPARED = "prepared"
_FAILED = "prepare-failed"
_RELEASED = "released"


@dataclass(frozen=True)
class JobSteps:
    """What travels to the nodes: the job id and its steps (pickled callables or commands)."""

    job_id: str
    prepare: str | bytes | None
    release: str | bytes | None


def _step_payload(step: JobStep, name: str) -> str | bytes | None:
    if step is None or isinstance(step, str):
        return step
    if not callable(step):
        raise InputError(f"{name}={step!r} is neither a shell command nor a callable")
    try:
        return bytes(cloudpickle.dumps(step))
    except Exception as exc:
        raise InputError(f"{name}={step!r} cannot be pickled ({exc})") from None


@dataclass
class JobCall:
    """The job's function as it runs on a slot: prepare the node first if needed."""

    fn: Callable[..., Any]
    steps: JobSteps

    @property
    def needs_index(self) -> bool:
        return bool(getattr(self.fn, "needs_index", False))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ensure_prepared(self.steps)
        # As Batch's AZ_BATCH_JOB_ID: the task (and a command it starts) knows its job.
        os.environ["CLOUDMAP_JOB_ID"] = self.steps.job_id
        os.environ["CLOUDMAP_JOB_DIR"] = str(job_directory(self.steps.job_id))
        try:
            return self.fn(*args, **kwargs)
        finally:
            os.environ.pop("CLOUDMAP_JOB_ID", None)
            os.environ.pop("CLOUDMAP_JOB_DIR", None)


_prepared_here: set[str] = set()


def job_directory(job_id: str) -> Path:
    shared = Path(os.environ.get("CLOUDMAP_NODE_SHARED_DIR", os.getcwd()))
    return shared / "jobs" / job_id


def ensure_prepared(steps: JobSteps) -> None:
    """Run the job's preparation on this node unless a slot here already did."""
    if steps.job_id in _prepared_here:
        return
    directory = job_directory(steps.job_id)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / _FAILED).exists():
            raise JobPreparationError((directory / _FAILED).read_text())
        if not (directory / _PREPARED).exists():
            error = _run_step(steps.prepare, "prepare", directory, steps.job_id)
            if error is not None:
                (directory / _FAILED).write_text(error)
                raise JobPreparationError(error)
            (directory / _PREPARED).write_text("ok")
    _prepared_here.add(steps.job_id)


async def release_node(steps: JobSteps) -> str | None:
    """On one node, through a slot: run the release once if the node ran the preparation.

    Returns None when there was nothing to do or it succeeded, else the error message.
    """
    directory = job_directory(steps.job_id)
    if not (directory / _PREPARED).exists() and not (directory / _FAILED).exists():
        return None
    if (directory / _RELEASED).exists():
        return None
    error = await asyncio.get_running_loop().run_in_executor(
        None, _run_step, steps.release, "release", directory, steps.job_id
    )
    (directory / _RELEASED).write_text(error or "ok")
    return error


def _run_step(step: str | bytes | None, name: str, directory: Path, job_id: str) -> str | None:
    """Run ``prepare`` or ``release`` in the job's directory; None if it succeeded."""
    if step is None:
        return None
    node = os.environ.get("CLOUDMAP_NODE_ID", "this node")
    env = {**os.environ, "CLOUDMAP_JOB_ID": job_id, "CLOUDMAP_JOB_DIR": str(directory)}
    if isinstance(step, str):
        with (
            (directory / f"{name}-stdout.txt").open("wb") as out,
            (directory / f"{name}-stderr.txt").open("wb") as err,
        ):
            code = subprocess.run(
                step, shell=True, cwd=directory, env=env, stdout=out, stderr=err, check=False
            ).returncode
        if code == 0:
            return None
        tail = (directory / f"{name}-stderr.txt").read_text(errors="replace")[-2000:]
        return f"the job's {name} step exited with status {code} on {node}\n{tail}".rstrip()
    previous = os.getcwd()
    try:
        os.chdir(directory)
        cloudpickle.loads(step)()
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        (directory / f"{name}-stderr.txt").write_text(text)
        return f"the job's {name} step raised on {node}: {type(exc).__name__}: {exc}\n{text}"
    finally:
        os.chdir(previous)
    return None


class Job:
    """A set of maps and commands sharing a preparation and a release (``pool.job(...)``).

    ``map``, ``imap`` and ``run`` take the same arguments as the pool's. Leaving the
    ``with`` block (or ``close()``) runs the release on every node that was prepared.
    """

    def __init__(self, pool: Pool, prepare: JobStep = None, release: JobStep = None) -> None:
        self._pool = pool
        self.id = f"job-{uuid.uuid4().hex[:10]}"
        self.steps = JobSteps(
            self.id, _step_payload(prepare, "prepare"), _step_payload(release, "release")
        )
        self._closed = False

    def wrap(self, fn: Callable[..., Any]) -> JobCall:
        if self._closed:
            raise InputError(f"{self.id} has ended; start a new pool.job(...) for more work")
        return JobCall(fn, self.steps)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> list[Any]:
        return self._pool._map_all(fn, iterables, _options(options), label="map", job=self)

    def imap(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any
    ) -> Iterator[Any]:
        ordered = options.pop("ordered", True)
        return self._pool._imap(fn, iterables, _options(options), ordered=ordered, job=self)

    def run(self, command: str, items: Iterable[Any], **options: Any) -> list[Any]:
        return self._pool._run(command, items, _options(options), job=self)

    def close(self) -> None:
        """Run the release on every prepared node (once); raise JobReleaseError if any fails."""
        if self._closed:
            return
        self._closed = True
        failures = self._pool._release_job(self.steps)
        if failures:
            listed = "; ".join(
                f"{node}: {message.splitlines()[0]}" for node, message in failures.items()
            )
            raise JobReleaseError(f"the release of {self.id} failed on {listed}", failures)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the block's own error wins; a failed release is only reported beside it
            self.close()
        except JobReleaseError as release_error:
            import warnings

            warnings.warn(str(release_error), stacklevel=2)

    def __repr__(self) -> str:
        return f"<cloudmap.Job {self.id}{' ended' if self._closed else ''}>"


def _options(options: dict[str, Any]) -> Any:
    from .engine import MapOptions

    return MapOptions.from_keywords(options, "job.map")
