"""Job preparation and release on a node, as Batch's job preparation and release tasks.

A job's function runs on a slot wrapped in :class:`JobCall`, which runs the job's
``prepare`` step once on the node before the node's first task of the job; the client runs
:func:`release_node` on every node at the job's end. The job has a directory
``shared/jobs/<job id>`` (``CLOUDMAP_JOB_DIR``) where both steps run, with their output
kept as ``prepare-stdout.txt`` and so on. The slots of a node agree through a lock file
there, so ``prepare`` runs once per node however many slots it has.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from ..errors import JobPreparationError

_PREPARED = "prepared"
_FAILED = "prepare-failed"
_RELEASED = "released"


@dataclass(frozen=True)
class JobSteps:
    """What travels to the nodes: the job id and its steps (pickled callables or commands)."""

    job_id: str
    prepare: str | bytes | None
    release: str | bytes | None


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
