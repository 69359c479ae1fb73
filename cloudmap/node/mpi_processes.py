"""The processes of one MPI run on one node, found and killed so that none outlives the run.

MPICH's hydra puts every rank in a process group of its own, and a killed proxy leaves its
ranks running as orphans (their parent is gone, so they no longer show under anything the
node started). A run's processes are therefore recorded while they are still descendants
of the process that began them (``mpiexec`` on the primary node, ``hydra_pmi_proxy`` on
every node), and every recorded process is killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

#: Seconds to wait for killed processes to be gone before giving up on them.
END_WAIT = 5.0


class ProcessTree:
    """Every process seen under ``pid`` during a run, so that none outlives the run."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, Any] = {}

    def look(self) -> None:
        """Record what runs under the root now, and under what was recorded before (a
        rank whose proxy died still has its own children)."""
        import psutil

        children: dict[int, list[Any]] = {}
        for process in psutil.process_iter(["ppid"]):
            children.setdefault(process.info["ppid"], []).append(process)
        pending = [self.pid, *self.seen]
        while pending:
            for child in children.get(pending.pop(), []):
                if child.pid not in self.seen:
                    self.seen[child.pid] = child
                    pending.append(child.pid)

    async def end(self) -> None:
        """SIGKILL every recorded process that still runs, and wait (bounded) until none
        does."""
        import psutil

        self.look()
        for member in self.seen.values():
            with contextlib.suppress(psutil.Error):
                if member.is_running():
                    member.kill()
        # Killed ranks are not this process's children, and end as zombies until their
        # new parent reaps them: wait until none is still running (a bounded wait).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + END_WAIT
        while any(_running_process(m) for m in self.seen.values()):
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.01)


async def kill(process: asyncio.subprocess.Process, tree: ProcessTree) -> None:
    """SIGKILL a run's root process and everything under it at once (found first, while
    they are still its descendants): a run is stopped because it failed, timed out or was
    abandoned, and its ranks' work is lost either way. Hydra's processes ignore SIGTERM
    and SIGINT while they wait for a peer, so nothing gentler is tried."""
    tree.look()
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await tree.end()
    with contextlib.suppress(ProcessLookupError):
        await process.wait()


def _running_process(process: Any) -> bool:
    import psutil

    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def connected_to(pid: int, port: int, *, listening: bool) -> int:
    """How many established TCP connections of process ``pid`` have ``port`` at their
    local end (``listening``: connections accepted on that port) or at their remote end
    (connections made to it)."""
    import psutil

    try:
        process = psutil.Process(pid)
        # net_connections() since psutil 6; connections() before (distributed needs 5.9+).
        listing = getattr(process, "net_connections", None) or process.connections
        connections = listing("tcp")
    except psutil.Error:
        return 0
    count = 0
    for connection in connections:
        if connection.status != psutil.CONN_ESTABLISHED or not connection.raddr:
            continue
        end = connection.laddr if listening else connection.raddr
        count += end.port == port
    return count
