"""The nodes' part of an MPI run before and around the ranks: prepare every node
(coordination), start MPICH's ``mpiexec`` on the primary, watch it, collect, clean up.

These coroutines run inside a slot process through ``Client.run``, on its event loop, so
they only await: the slot keeps its heartbeats while a run lasts hours.

The primary node's slot starts ``mpiexec -launcher manual``: hydra then starts no process
on any host itself, but prints one ``hydra_pmi_proxy`` command line per host and waits
for the proxies to connect back. The client hands line ``N`` to node ``N``'s slot
(:mod:`.mpi_proxy`), so every node's ranks are started by that node, with its own
environment, with no ssh between nodes; then :func:`watch_launcher` waits for the run.

hydra's hosts are named by node id, not address: hydra merges hosts of the same name into
one proxy, and the local provider's nodes all have the address 127.0.0.1. With ids, a run
takes one path wherever its nodes are: one proxy per node, ranks of one node talking
through shared memory, and ranks of different nodes through the netmod (TCP), even when
the nodes share a machine. hydra never contacts its hosts with the manual launcher, so
the names are only labels; ``-localhost`` gives the address the proxies connect to.

``mpiexec`` runs one MPMD block per node (``-n ranks_per_node`` in that node's run
directory), and ``-genvnone`` keeps the primary's environment from overriding the nodes'
own: each rank inherits its proxy's. Each rank's stdout and stderr end in files on the
primary, as Batch keeps a multi-instance task's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .mpi_processes import ProcessTree, connected_to, kill
from .mpi_proxy import PROXY_CONNECT_TIMEOUT, control_address
from .mpi_rank import ERROR_MARKER, EXIT_MARKER
from .mpi_spec import MpiSpec

#: Seconds between looks at the ranks' stderr files while a run goes on.
WATCH_INTERVAL = 0.05
#: Every how many of those the process tree of the run is listed again.
TREE_LOOK_EVERY = 20
#: Most bytes of each rank's stdout and stderr sent back to the client.
OUTPUT_LIMIT = 1 << 20
#: Seconds ``mpiexec`` has to end by itself once a rank failed, before it is killed.
FAILURE_GRACE = 0.5
#: Seconds ``mpiexec`` has to print its proxies' command lines.
LAUNCH_LINES_TIMEOUT = 30.0
#: Seconds past the proxies' own deadline (they report a failure to the client first)
#: after which ``mpiexec`` is ended if not all of them connected.
GUARD_MARGIN = 5.0
#: Bytes at the end of a rank's stderr searched for its exit status while the run goes on.
EXIT_TAIL = 64

LAUNCH_PREFIX = "HYDRA_LAUNCH: "
LAUNCH_END = "HYDRA_LAUNCH_END"


@dataclass
class _Launcher:
    process: asyncio.subprocess.Process
    tree: ProcessTree
    output: bytearray
    guard: asyncio.Future[None] | None = None


_running: dict[str, _Launcher] = {}


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


def run_directory(run_id: str) -> Path:
    tasks = Path(os.environ.get("CLOUDMAP_NODE_TASKS_DIR", os.getcwd()))
    return tasks / f"mpi-{run_id}"


async def coordinate(spec: MpiSpec, index: int) -> dict[str, Any]:
    """On every node before the ranks start: make the run's directory, run coordination."""
    directory = run_directory(spec.run_id)
    directory.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Any] = {
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


def _argv(spec: MpiSpec, directories: list[str]) -> list[str]:
    primary = Path(directories[0])
    output = primary / "output"
    if spec.call is not None:
        program = [sys.executable, "-m", "cloudmap.node.mpi_rank"]
        program += [str(primary / "call.pkl"), str(primary / "result.pkl")]
    else:
        assert spec.command is not None
        program = ["/bin/sh", "-c", spec.command]
    # Each rank ends its stderr with its exit status, so a failure can be pinned on a rank.
    wrapper = f'"$@"; rc=$?; echo "{EXIT_MARKER}$rc" >&2; exit $rc'
    hosts = ",".join(f"{node.id}:{spec.ranks_per_node}" for node in spec.nodes)
    argv = [str(mpiexec_path()), "-launcher", "manual", "-hosts", hosts]
    argv += ["-localhost", spec.nodes[0].host, "-genvnone"]
    argv += ["-outfile-pattern", str(output / "stdout.%r")]
    argv += ["-errfile-pattern", str(output / "stderr.%r")]
    for index, directory in enumerate(directories):
        if index:
            argv.append(":")
        argv += ["-n", str(spec.ranks_per_node), "-wdir", directory]
        argv += ["/bin/sh", "-c", wrapper, "cloudmap.node.mpi-rank", *program]
    return argv


async def start_launcher(spec: MpiSpec, directories: list[str]) -> dict[str, Any]:
    """On the primary node: start ``mpiexec``; return its proxies' command lines, in node
    order (``{"lines": [...]}``), or why it could not start (``{"error": text}``)."""
    primary = Path(directories[0])
    (primary / "output").mkdir(parents=True, exist_ok=True)
    if spec.call is not None:
        (primary / "call.pkl").write_bytes(spec.call)
    process = await asyncio.create_subprocess_exec(
        *_argv(spec, directories),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    tree = ProcessTree(process.pid)
    output = bytearray()
    lines: list[str] = []
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_read_launch_lines(process, output, lines), LAUNCH_LINES_TIMEOUT)
    addresses = [control_address(line) for line in lines]
    if len(lines) != len(spec.nodes) or None in addresses or process.returncode is not None:
        await kill(process, tree)
        assert process.stdout is not None
        output += await process.stdout.read()
        return {
            "error": f"mpiexec printed {len(lines)} proxy command lines for "
            f"{len(spec.nodes)} nodes (exit status {process.returncode})\n--- mpiexec output "
            f"---\n{output.decode(errors='replace')[-OUTPUT_LIMIT:]}"
        }
    launcher = _Launcher(process, tree, output)
    port = addresses[0][1] if addresses[0] else 0
    launcher.guard = asyncio.ensure_future(_guard(launcher, port, len(lines)))
    _running[spec.run_id] = launcher
    return {"lines": lines}


async def _read_launch_lines(
    process: asyncio.subprocess.Process, output: bytearray, lines: list[str]
) -> None:
    """Read ``mpiexec``'s stdout up to the end of its proxies' command lines."""
    assert process.stdout is not None
    while True:
        raw = await process.stdout.readline()
        output += raw
        line = raw.decode(errors="replace").strip()
        if not raw or line == LAUNCH_END:
            return
        if line.startswith(LAUNCH_PREFIX):
            lines.append(line[len(LAUNCH_PREFIX) :])


async def _guard(launcher: _Launcher, port: int, proxies: int) -> None:
    """Read what ``mpiexec`` prints, and end it if its proxies have not all connected in
    time: it would wait for them forever, whatever became of the client that was to
    start them."""
    process = launcher.process
    assert process.stdout is not None
    reader = asyncio.ensure_future(process.stdout.read())
    deadline = asyncio.get_running_loop().time() + PROXY_CONNECT_TIMEOUT + GUARD_MARGIN
    try:
        while process.returncode is None and asyncio.get_running_loop().time() < deadline:
            if connected_to(process.pid, port, listening=True) >= proxies:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), 0.1)
        else:
            if process.returncode is None:
                await kill(process, launcher.tree)
        launcher.output += await reader
    finally:
        reader.cancel()


async def watch_launcher(spec: MpiSpec, directories: list[str]) -> dict[str, Any]:
    """On the primary node, once every proxy was started: wait for the run, stop it on a
    timeout or when a rank fails, and collect what the ranks left."""
    launcher = _running.get(spec.run_id)
    if launcher is None:
        raise RuntimeError(f"MPI run {spec.run_id} is not running on this node (stopped?)")
    process = launcher.process
    output = Path(directories[0]) / "output"
    timed_out = False
    first_failure: int | None = None
    try:
        timed_out, first_failure = await _watch(process, output, spec, launcher.tree)
    finally:
        if _running.get(spec.run_id) is launcher:
            del _running[spec.run_id]
        await kill(process, launcher.tree)  # ranks hydra signalled may outlive mpiexec
        if launcher.guard is not None:
            await launcher.guard
    outcome = _collect(spec, output, Path(directories[0]) / "result.pkl")
    outcome.update(
        exit_code=process.returncode if first_failure is None else first_failure,
        timed_out=timed_out,
        launcher=launcher.output.decode(errors="replace")[-OUTPUT_LIMIT:],
    )
    return outcome


async def _watch(
    process: asyncio.subprocess.Process, output: Path, spec: MpiSpec, tree: ProcessTree
) -> tuple[bool, int | None]:
    """Wait for mpiexec; return (timed out, exit status of a rank that failed first).

    MPICH's hydra stops every rank when one calls MPI_Abort, but waits for the others when
    one merely exits non-zero; a command-mode rank that fails must stop the run too, so
    the end of the ranks' stderr files (where each rank's exit status arrives) is watched
    while mpiexec runs.
    """
    loop = asyncio.get_running_loop()
    deadline = None if spec.timeout is None else loop.time() + spec.timeout
    for look in itertools.count():
        # Listing the process tree scans /proc: early (the ranks have just started), then
        # once a second, which is enough to know every rank of a long run.
        if look in (2, 6) or look % TREE_LOOK_EVERY == 0:
            tree.look()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), WATCH_INTERVAL)
            return False, None
        for rank in range(spec.ranks):
            code = _exit_status(_read(output / f"stderr.{rank}", EXIT_TAIL))
            if code:
                # After MPI_Abort hydra ends the run itself: let it, so that what the
                # other nodes' ranks wrote (the error of the rank that aborted) arrives.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(process.wait()), FAILURE_GRACE)
                return False, code
        if deadline is not None and loop.time() > deadline:
            return True, None
    raise AssertionError("unreachable")


async def stop_run(run_id: str) -> bool:
    """Kill ``mpiexec`` of a run that the client gave up on (Ctrl-C, a lost node, a proxy
    that did not start); True if it was still running here."""
    launcher = _running.pop(run_id, None)
    if launcher is None:
        return False
    await kill(launcher.process, launcher.tree)
    return True


def _exit_status(text: str) -> int | None:
    """The exit status a rank's wrapper wrote at the end of ``text``, if it did."""
    _, marker, rest = text.rpartition(EXIT_MARKER)
    found = re.match(r"(-?\d+)\s*$", rest) if marker else None
    return int(found.group(1)) if found else None


def _collect(spec: MpiSpec, output: Path, result_path: Path) -> dict[str, Any]:
    stdout, stderr, exits, errors = [], [], {}, {}
    for rank in range(spec.ranks):
        stdout.append(_read(output / f"stdout.{rank}"))
        text = _read(output / f"stderr.{rank}")
        code = _exit_status(text)
        if code is not None:
            exits[rank] = code
            text = text[: text.rindex(EXIT_MARKER)]
        marked = [line for line in text.splitlines() if line.startswith(ERROR_MARKER)]
        if marked:
            errors[rank] = marked[-1][len(ERROR_MARKER) :]
            text = "\n".join(
                line for line in text.splitlines() if not line.startswith(ERROR_MARKER)
            )
        stderr.append(text)
    result = result_path.read_bytes() if result_path.exists() else None
    return {"stdout": stdout, "stderr": stderr, "exits": exits, "errors": errors, "result": result}


def _read(path: Path, limit: int = OUTPUT_LIMIT) -> str:
    """The last ``limit`` bytes of a file, as text ("" if there is no such file)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - limit))
            data = file.read()
    except FileNotFoundError:
        return ""
    return data.decode(errors="replace")
