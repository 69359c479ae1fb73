"""cloudmap's node processes on this machine: finding them (nothing left behind) and killing them.

For harnesses whose nodes run here (capability ``local_nodes``). A node's processes are its
agent, its slots, its start task and its MPI ranks; each names ``cloudmap.node`` on its
command line, and the node's directory when it runs from one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import psutil

#: What every node process has on its command line.
NODE_MARKER = "cloudmap.node"


def node_processes(*markers: str, under: Iterable[str] = ()) -> list[psutil.Process]:
    """Live processes whose command line contains every one of ``markers`` (by default
    ``cloudmap.node``) that this process started, or whose command line names a path under
    a directory in ``under`` (a node agent that its start task left running is nobody's
    child: Batch nodes do that)."""
    wanted = markers or (NODE_MARKER,)
    roots = list(under)
    mine = {process.pid for process in psutil.Process(os.getpid()).children(recursive=True)}
    return _alive(
        lambda pid, line: (
            all(marker in line for marker in wanted)
            and (pid in mine or any(_names(line, root) for root in roots))
        )
    )


def kill_node_processes(root: str) -> list[psutil.Process]:
    """SIGKILL every cloudmap process that runs from the node directory ``root``, and only
    those: the node (a VM, to its provider) stays up, as when its agent runs out of memory."""
    killed = []
    for process in _alive(lambda _, line: NODE_MARKER in line and _names(line, root)):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
        killed.append(process)
    return killed


def _alive(chosen: Callable[[int, str], bool]) -> list[psutil.Process]:
    """Processes, not zombies, for which ``chosen(pid, command line)`` is true."""
    found = []
    for process in psutil.process_iter():
        try:
            line = " ".join(process.cmdline())
            if chosen(process.pid, line) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def _names(line: str, root: str) -> bool:
    """Whether a command line names ``root`` or a path under it (not a sibling named alike,
    such as node-10 for node-1)."""
    root = str(root).rstrip("/")
    return f"{root}/" in line or f"{root} " in line or line.endswith(root)
