"""What the nodes of an MPI run do: prepare (coordination), launch, collect, clean up.

These coroutines run inside a slot process through ``Client.run``, on its event loop, so
they only await: the slot keeps its heartbeats while a run lasts hours. The primary node's
slot launches MPICH's ``mpiexec`` from the slot's own environment, one MPMD block per node
(``-n ranks_per_node`` with that node's working directory and ``CLOUDMAP_*`` variables),
with each rank's stdout and stderr in files on the primary, as Batch keeps a
multi-instance task's output. Locally every node is on this machine, so hydra's ``fork``
launcher starts all ranks without ssh; the ranks stay in the node's process group, so a
node that is killed takes its ranks with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .mpi_rank import ERROR_MARKER

#: Seconds between looks at the ranks' exit files while a run goes on.
WATCH_INTERVAL = 0.05
#: Every how many of those the process tree of the run is listed again.
TREE_LOOK_EVERY = 20
#: Most bytes of each rank's stdout and stderr sent back to the client.
OUTPUT_LIMIT = 1 << 20

_running: dict[str, asyncio.subprocess.Process] = {}


@dataclass(frozen=True)
class RunNode:
    id: str
    host: str
    worker: str


@dataclass(frozen=True)
class MpiSpec:
    """One MPI run, as the client describes it to the nodes."""

    run_id: str
    nodes: tuple[RunNode, ...]
    ranks_per_node: int
    command: str | None = None  # command mode
    call: bytes | None = None  # Python mode: cloudpickled (fn, args, kwargs)
    coordination: str | bytes | None = None  # shell command, or cloudpickled callable
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> int:
        return len(self.nodes) * self.ranks_per_node

    def environment(self, index: int, directory: str) -> dict[str, str]:
        """The ``CLOUDMAP_*`` (Batch: ``AZ_BATCH_*``) variables of node ``index``'s ranks."""
        hosts = ",".join(node.host for node in self.nodes)
        return {
            **self.env,
            "CLOUDMAP_HOST_LIST": hosts,
            "CLOUDMAP_NODE_LIST": ",".join(node.id for node in self.nodes),
            "CLOUDMAP_MASTER_NODE": self.nodes[0].host,
            "CLOUDMAP_MASTER_NODE_ID": self.nodes[0].id,
            "CLOUDMAP_IS_MASTER": "true" if index == 0 else "false",
            "CLOUDMAP_TASK_SHARED_DIR": directory,
            "CLOUDMAP_RANKS_PER_NODE": str(self.ranks_per_node),
        }


def mpiexec_path() -> Path:
    """The MPI launcher of the Python environment the slot runs in (the ``mpich`` wheel)."""
    return Path(sys.executable).parent / "mpiexec"


def missing_mpi(python_mode: bool) -> str | None:
    """Why MPI cannot run on this node, or None."""
    if not mpiexec_path().exists():
        return f"there is no MPI launcher at {mpiexec_path()}"
    if python_mode:
        try:
            import mpi4py  # noqa: F401
        except ImportError as exc:
            return f"mpi4py cannot be imported ({exc})"
    return None


def node_environment() -> dict[str, str]:
    """What a rank on this node must see of the node: its ``CLOUDMAP_NODE_*`` and
    ``CLOUDMAP_POOL_ID`` variables (ranks are started by the primary, whose own differ),
    and a ``PATH`` that finds this environment's ``python``, ``mpicc`` and ``mpiexec``."""
    env = {k: v for k, v in os.environ.items() if k.startswith("CLOUDMAP_NODE_")}
    env["CLOUDMAP_POOL_ID"] = os.environ.get("CLOUDMAP_POOL_ID", "")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return env


def run_directory(run_id: str) -> Path:
    tasks = Path(os.environ.get("CLOUDMAP_NODE_TASKS_DIR", os.getcwd()))
    return tasks / f"mpi-{run_id}"


async def coordinate(spec: MpiSpec, index: int) -> dict[str, Any]:
    """On every node before the ranks start: make the run's directory, run coordination."""
    directory = run_directory(spec.run_id)
    directory.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Any] = {
        "node_env": node_environment(),
        "directory": str(directory),
        "missing": missing_mpi(spec.call is not None),
    }
    if outcome["missing"] or spec.coordination is None:
        return outcome
    env = {**os.environ, **spec.environment(index, str(directory))}
    if isinstance(spec.coordination, str):
        process = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            spec.coordination,
            cwd=directory,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        outcome.update(exit_code=process.returncode, stdout=out.decode(errors="replace"))
        outcome["stderr"] = err.decode(errors="replace")
        return outcome
    import cloudpickle

    def call() -> None:
        fn = cloudpickle.loads(spec.coordination)
        saved = dict(os.environ)
        os.environ.update(spec.environment(index, str(directory)))
        try:
            fn()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    try:
        await asyncio.get_running_loop().run_in_executor(None, call)
    except Exception as exc:
        import traceback

        outcome.update(exit_code=1, stdout="", stderr=traceback.format_exc(), error=repr(exc))
    else:
        outcome.update(exit_code=0, stdout="", stderr="")
    return outcome


async def launch(
    spec: MpiSpec, directories: list[str], node_envs: list[dict[str, str]]
) -> dict[str, Any]:
    """On the primary node: run every rank under mpiexec and collect what they left."""
    primary = Path(directories[0])
    output = primary / "output"
    output.mkdir(parents=True, exist_ok=True)
    result_path = primary / "result.pkl"
    if spec.call is not None:
        (primary / "call.pkl").write_bytes(spec.call)
        program = [sys.executable, "-m", "cloudmap.node.mpi_rank"]
        program += [str(primary / "call.pkl"), str(result_path)]
    else:
        assert spec.command is not None
        program = ["/bin/sh", "-c", spec.command]
    # Each rank records its exit status, so a failure can be pinned on a rank.
    wrapper = f'"$@"; rc=$?; echo $rc > "{output}/exit.$PMI_RANK"; exit $rc'
    argv = [str(mpiexec_path()), "-launcher", "fork"]
    argv += ["-outfile-pattern", str(output / "stdout.%r")]
    argv += ["-errfile-pattern", str(output / "stderr.%r")]
    for index, directory in enumerate(directories):
        if index:
            argv.append(":")
        argv += ["-n", str(spec.ranks_per_node), "-wdir", directory]
        for name, value in {**node_envs[index], **spec.environment(index, directory)}.items():
            argv += ["-env", name, value]
        argv += ["/bin/sh", "-c", wrapper, "cloudmap.node.mpi-rank", *program]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    _running[spec.run_id] = process
    assert process.stdout is not None
    reader = asyncio.ensure_future(process.stdout.read())
    timed_out = False
    first_failure: int | None = None
    tree = _Tree(process.pid)
    try:
        timed_out, first_failure = await _watch(process, output, spec.timeout, tree)
        if timed_out or first_failure is not None:
            await _stop(process)
    finally:
        _running.pop(spec.run_id, None)
        if process.returncode is None:
            await _stop(process)
        await tree.end()  # ranks hydra signalled may outlive mpiexec by a moment
    launcher_output = await reader
    outcome = _collect(spec, output, result_path)
    outcome.update(
        exit_code=process.returncode if first_failure is None else first_failure,
        timed_out=timed_out,
        launcher=launcher_output.decode(errors="replace")[-OUTPUT_LIMIT:],
    )
    return outcome


class _Tree:
    """Every process seen under mpiexec during a run, so that none outlives the run."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, Any] = {}

    def look(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)

    async def end(self) -> None:
        import psutil

        for member in self.seen.values():
            with contextlib.suppress(psutil.Error):
                if member.is_running():
                    member.kill()
        # Killed ranks are not this process's children, and end as zombies until their
        # new parent reaps them: wait until none is still running (a bounded wait).
        deadline = asyncio.get_running_loop().time() + 5.0
        while any(_running_process(m) for m in self.seen.values()):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)


def _running_process(process: Any) -> bool:
    import psutil

    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


async def _watch(
    process: asyncio.subprocess.Process, output: Path, timeout: float | None, tree: _Tree
) -> tuple[bool, int | None]:
    """Wait for mpiexec; return (timed out, exit status of a rank that failed first).

    MPICH's hydra stops every rank when one calls MPI_Abort, but waits for the others when
    one merely exits non-zero; a command-mode rank that fails must stop the run too, so
    the ranks' exit files are watched while mpiexec runs.
    """
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    for look in itertools.count():
        # Listing the process tree scans /proc: early (the ranks have just started), then
        # once a second, which is enough to know every rank of a long run.
        if look in (2, 6) or look % TREE_LOOK_EVERY == 0:
            tree.look()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), WATCH_INTERVAL)
            return False, None
        for path in output.glob("exit.*"):
            code = path.read_text().strip()
            if re.fullmatch(r"-?\d+", code) and int(code) != 0:
                return False, int(code)
        if deadline is not None and asyncio.get_running_loop().time() > deadline:
            return True, None
    raise AssertionError("unreachable")


async def stop_run(run_id: str) -> bool:
    """Kill a run that the client gave up on (Ctrl-C); True if it was still running."""
    process = _running.pop(run_id, None)
    if process is None:
        return False
    await _stop(process)
    return True


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Kill mpiexec and every rank under it at once (ranks are found first, as its
    descendants): a run is stopped because it failed, timed out or was abandoned, and its
    ranks' work is lost either way."""
    tree = _Tree(process.pid)
    tree.look()
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await tree.end()
    with contextlib.suppress(ProcessLookupError):
        await process.wait()


def _collect(spec: MpiSpec, output: Path, result_path: Path) -> dict[str, Any]:
    stdout, stderr, exits, errors = [], [], {}, {}
    for rank in range(spec.ranks):
        stdout.append(_read(output / f"stdout.{rank}"))
        text = _read(output / f"stderr.{rank}")
        marked = [line for line in text.splitlines() if line.startswith(ERROR_MARKER)]
        if marked:
            errors[rank] = marked[-1][len(ERROR_MARKER) :]
            text = "\n".join(
                line for line in text.splitlines() if not line.startswith(ERROR_MARKER)
            )
        stderr.append(text)
        code = _read(output / f"exit.{rank}").strip()
        if re.fullmatch(r"-?\d+", code):
            exits[rank] = int(code)
    result = result_path.read_bytes() if result_path.exists() else None
    return {"stdout": stdout, "stderr": stderr, "exits": exits, "errors": errors, "result": result}


def _read(path: Path) -> str:
    try:
        with path.open("rb") as file:
            data = file.read()
    except FileNotFoundError:
        return ""
    return data[-OUTPUT_LIMIT:].decode(errors="replace")
