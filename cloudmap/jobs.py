"""Jobs with preparation and release tasks, as Batch's job preparation and release.

``with pool.job(prepare=..., release=...) as job: job.map(...)`` runs ``prepare`` (a shell
command or a callable) once on each node, before that node's first task of the job, and
``release`` on every node that ran it when the ``with`` block ends, failure included. This
is the client's side; what runs on the nodes is :mod:`cloudmap.node.job_steps`.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import cloudpickle

from .errors import InputError, JobPreparationError, JobReleaseError
from .node.job_steps import JobSteps
from .options import MapOptions

if TYPE_CHECKING:
    from .work import Work

JobStep = str | Callable[[], Any] | None

# The job errors are cloudmap.JobPreparationError and cloudmap.JobReleaseError; they are
# also importable from here, where docs/storage.md first showed them.
__all__ = ["Job", "JobPreparationError", "JobReleaseError", "JobStep"]


def _step_payload(step: JobStep, name: str) -> str | bytes | None:
    if step is None or isinstance(step, str):
        return step
    if not callable(step):
        raise InputError(f"{name}={step!r} is neither a shell command nor a callable")
    try:
        return bytes(cloudpickle.dumps(step))
    except Exception as exc:
        raise InputError(f"{name}={step!r} cannot be pickled ({exc})") from None


class Job:
    """A set of maps and commands sharing a preparation and a release (``pool.job(...)``).

    ``map``, ``imap`` and ``run`` take the same arguments as the pool's. Leaving the
    ``with`` block (or ``close()``) runs the release on every node that was prepared.
    """

    def __init__(self, runner: Work, prepare: JobStep = None, release: JobStep = None) -> None:
        self._runner = runner
        self.id = f"job-{uuid.uuid4().hex[:10]}"
        self.steps = JobSteps(
            self.id, _step_payload(prepare, "prepare"), _step_payload(release, "release")
        )
        self._closed = False

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> list[Any]:
        return self._runner.map_all(fn, iterables, _options(options), job=self._open_steps())

    def imap(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any
    ) -> Iterator[Any]:
        ordered = options.pop("ordered", True)
        steps = self._open_steps()
        return self._runner.imap(fn, iterables, _options(options), ordered=ordered, job=steps)

    def run(self, command: str, items: Iterable[Any], **options: Any) -> list[Any]:
        return self._runner.run(command, items, _options(options), job=self._open_steps())

    def _open_steps(self) -> JobSteps:
        """The steps new work of this job carries; refused once the job has ended."""
        if self._closed:
            raise InputError(f"{self.id} has ended; start a new pool.job(...) for more work")
        return self.steps

    def close(self) -> None:
        """Run the release on every prepared node (once); raise JobReleaseError if any fails."""
        if self._closed:
            return
        self._closed = True
        failures = self._runner.release_job(self.steps)
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
            warnings.warn(str(release_error), stacklevel=2)

    def __repr__(self) -> str:
        return f"<cloudmap.Job {self.id}{' ended' if self._closed else ''}>"


def _options(options: dict[str, Any]) -> MapOptions:
    return MapOptions.from_keywords(options, "job.map")
