"""Every node's part of an MPI run: start the hydra proxy that the primary's ``mpiexec``
asked for, and make sure nothing of it outlives the run.

``mpiexec -launcher manual`` does not start its proxies itself: it prints one
``hydra_pmi_proxy`` command line per host and waits for each to connect back to it. The
client hands line ``N`` to node ``N``'s slot, which runs it here, so cloudmap needs no ssh
between nodes: the proxy, and the ranks it forks, are processes of the node they belong
to, with that node's environment (its ``CLOUDMAP_NODE_*`` and Batch's ``AZ_BATCH_*``
variables, which ``mpiexec -genvnone`` leaves alone) plus the run's variables.

The proxy stays in the slot's session and process group, like every other process of the
node, so a node that goes away (a VM; the emulator kills a node's session) takes it and
its ranks along; a session of its own would outlive its node there. A group of its own
would not help to end it either: hydra moves each rank to a group of its own. So the run's
processes are recorded while they run and killed one by one (:mod:`.mpi_processes`).
These coroutines run in the slot's event loop through ``Client.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .mpi_processes import ProcessTree, connected_to, kill
from .mpi_spec import MpiSpec

#: Seconds a proxy has to connect to the primary's ``mpiexec`` before the run fails.
PROXY_CONNECT_TIMEOUT = 30.0
#: Seconds between looks at a starting proxy, and between listings of a running one's
#: process tree.
CONNECT_POLL = 0.01
TREE_LOOK_INTERVAL = 1.0
#: Settings for MPICH's ranks on different nodes: libfabric's TCP provider. MPICH's
#: default netmod (UCX) hung over TCP in the spike of decision 0007; ``env=`` of a run
#: overrides these (for example to use InfiniBand on HPC VM sizes).
NETMOD_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}
#: Most bytes of a proxy's own output kept for an error message.
LOG_TAIL = 4000

_CONTROL = re.compile(r"--control-port\s+(\S+):(\d+)")


@dataclass
class _Proxy:
    process: asyncio.subprocess.Process
    tree: ProcessTree
    guard: asyncio.Future[None] | None = None


_proxies: dict[str, _Proxy] = {}


def proxy_environment(spec: MpiSpec, index: int, directory: str) -> dict[str, str]:
    """The environment of node ``index``'s proxy, which its ranks inherit: the node's own
    (this slot's), a ``PATH`` that finds this environment's ``python``, ``mpicc`` and
    ``mpiexec``, the netmod settings, and the run's variables."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    netmod = dict(NETMOD_ENV)
    interface = node_interface(spec.nodes[index].host)
    if interface is not None:
        netmod["FI_TCP_IFACE"] = interface
    return {**os.environ, "PATH": path, **netmod, **spec.environment(index, directory)}


def node_interface(host: str) -> str | None:
    """The network interface that carries ``host``, the node's address on the pool's
    network (where its slots listen), so that the ranks' TCP goes where the pool's does;
    None lets libfabric choose.

    libfabric picks interfaces by name, not by address, and a machine can have several
    (the local provider's nodes listen on 127.0.0.1 of a laptop with Wi-Fi and Docker
    bridges). An address of 127.0.0.0/8 that no interface lists (each Batch emulator node
    has one) is reached through ``lo``, whose own address, 127.0.0.1, the ranks then bind.
    """
    import ipaddress

    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address == host for address in addresses):
            return name
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return "lo"
    return None


async def start_proxy(spec: MpiSpec, index: int, line: str, directory: str) -> str | None:
    """Start proxy ``line`` for node ``index`` of the run; return once it has connected to
    the primary's ``mpiexec`` (None), or why it did not (it is killed then)."""
    address = control_address(line)
    if address is None:
        return f"mpiexec printed a launch line cloudmap does not understand: {line!r}"
    host, port = address
    log_path = Path(directory) / "proxy.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *shlex.split(line),
            cwd=directory,
            env=proxy_environment(spec, index, directory),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    proxy = _Proxy(process, ProcessTree(process.pid))
    _proxies[spec.run_id] = proxy
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROXY_CONNECT_TIMEOUT
    # A proxy that ends with status 0 connected, ran its ranks and finished (a short run).
    while process.returncode != 0 and not connected_to(process.pid, port, listening=False):
        if process.returncode is not None or loop.time() > deadline:
            await end_proxy(spec.run_id)
            if process.returncode is not None and loop.time() <= deadline:
                why = f"it exited with status {process.returncode}"
            else:
                why = f"it did not connect within {PROXY_CONNECT_TIMEOUT:g} s"
            return (
                f"the MPI proxy could not join mpiexec at {host}:{port} on the "
                f"primary node ({why}); the nodes of an MPI run must reach each other on "
                "any TCP port (on Azure: Pool('azure', mpi=True), Batch's inter-node "
                f"communication)\n--- proxy output ---\n{_tail(log_path)}"
            )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), CONNECT_POLL)
    proxy.guard = asyncio.ensure_future(_follow(spec.run_id, proxy))
    return None


async def _follow(run_id: str, proxy: _Proxy) -> None:
    """Record the proxy's ranks while it runs; when it ends, kill whatever of its tree is
    left (ranks that ignored the end of the run) and forget it."""
    try:
        while proxy.process.returncode is None:
            proxy.tree.look()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(proxy.process.wait()), TREE_LOOK_INTERVAL)
        await proxy.tree.end()
    finally:
        if _proxies.get(run_id) is proxy:
            del _proxies[run_id]


async def end_proxy(run_id: str) -> bool:
    """SIGKILL this node's proxy of run ``run_id`` and every process under it (the run
    failed, timed out, lost a node or was abandoned); True if it was still known here."""
    proxy = _proxies.pop(run_id, None)
    if proxy is None:
        return False
    if proxy.guard is not None:
        proxy.guard.cancel()
    await kill(proxy.process, proxy.tree)
    return True


def control_address(line: str) -> tuple[str, int] | None:
    """Where a hydra proxy's command line tells it to connect: (host, port), or None if
    the line is not a proxy's."""
    found = _CONTROL.search(line)
    if found is None or "hydra_pmi_proxy" not in line:
        return None
    return found.group(1), int(found.group(2))


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-LOG_TAIL:].decode(errors="replace")
