"""The local provider: each node is a process tree on this machine (the default provider).

A node is ``python -m cloudmap.node DIR``, a node agent in its own session (so the whole tree
can be killed at once) with its own directory under one temporary pool directory. The agent
holds a pipe from us on its stdin and stops when it closes, so nodes die with the client.

Spot nodes are ordinary nodes that this provider may preempt: on demand (``preempt``) or at
random (``eviction=``), with or without notice, and kill with SIGKILL as a cloud would; like
Batch's, a preempted node can come back after ``restore_after`` seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..node import start_task
from ..node.agent import STOP_GRACE, NodeConfig
from ..node.layout import CONFIG_FILE, STATE_FILE, NodeLayout
from ..nodes import ProviderNode, StartTaskInfo
from ..pricing import NodePrices
from .base import PoolSpec, Provider
from .eviction import Eviction, EvictionProcess


@dataclass
class _LocalNode:
    id: str
    dedicated: bool
    layout: NodeLayout
    process: subprocess.Popen[bytes]
    created: float
    #: Set while the node serves its preemption notice, then when it is preempted; with
    #: the time it entered that state.
    leaving_since: float | None = None
    preempted_since: float | None = None


class LocalProvider(Provider):
    """Nodes as local processes.

    Options: ``root=`` (a directory for the node directories, default a new temporary one),
    ``keep_files=True`` to keep it after ``close()``, ``eviction=cloudmap.Eviction(...)`` to
    preempt spot nodes at random, ``restore_after=`` seconds after which a preempted node
    comes back (default: it stays preempted until removed), and ``prices=cloudmap.NodePrices(...)``
    to rehearse what the same pool would cost in the cloud (local nodes cost nothing).
    """

    name = "local"
    option_names = ("root", "keep_files", "eviction", "restore_after", "prices")
    supports_spot = True

    def __init__(
        self,
        spec: PoolSpec,
        *,
        root: str | None = None,
        keep_files: bool = False,
        eviction: Eviction | None = None,
        restore_after: float | None = None,
        prices: NodePrices | None = None,
        **options: Any,
    ) -> None:
        super().__init__(spec, **options)
        if prices is not None and not isinstance(prices, NodePrices):
            raise InputError(f"prices={prices!r} is not valid: pass cloudmap.NodePrices(...)")
        self._prices = prices
        if eviction is not None and not isinstance(eviction, Eviction):
            raise InputError(f"eviction={eviction!r} is not valid: pass cloudmap.Eviction(...)")
        if restore_after is not None and (
            isinstance(restore_after, bool)
            or not isinstance(restore_after, (int, float))
            or restore_after < 0
        ):
            raise InputError(
                f"restore_after={restore_after!r} is not valid: pass seconds >= 0, or None to "
                "keep preempted nodes preempted"
            )
        pickled_start_task = start_task.dump(spec.start_task)  # before making anything
        self.pool_id = f"local-{uuid.uuid4().hex[:8]}"
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="cloudmap-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_files = keep_files
        self._nodes: dict[str, _LocalNode] = {}
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._scheduler: str | None = None
        self._start_task_argv = self._start_task_command(spec, pickled_start_task)
        self.restore_after = restore_after
        #: (time, node id) of every preemption, for tests and benchmarks to count.
        self.preemptions: list[tuple[float, str]] = []
        self._timers: list[threading.Timer] = []
        self._closed = False
        self._evictions = (
            None
            if eviction is None
            else EvictionProcess(eviction, self._evictable, self._preempt_at_random)
        )

    def describe(self) -> str:
        return f"local processes in {self.root}"

    def node_size(self) -> str:
        slots = self.spec.slots_per_node
        return f"local process, {slots} slot{'s' if slots != 1 else ''}"

    def prices(self) -> NodePrices | None:
        return self._prices

    def _start_task_command(self, spec: PoolSpec, pickled: bytes | None) -> list[str] | None:
        """The command line each node agent runs as the start task."""
        if isinstance(spec.start_task, str):
            return ["/bin/sh", "-c", spec.start_task]
        if pickled is None:
            return None
        path = self.root / "start_task.pkl"
        path.write_bytes(pickled)
        return start_task.command(str(path))

    def start(self, scheduler_address: str | None) -> None:
        self._scheduler = scheduler_address
        self.add_nodes(self.spec.nodes)
        self.add_nodes(self.spec.spot_nodes, dedicated=False)
        if self._evictions is not None:
            self._evictions.start()

    def add_nodes(self, count: int, *, dedicated: bool = True) -> list[str]:
        if self._scheduler is None:
            raise RuntimeError("start() the provider before adding nodes")
        ids = []
        for _ in range(count):
            node_id = f"node-{next(self._numbers)}"
            node = self._spawn(node_id, dedicated)
            with self._lock:
                self._nodes[node_id] = node
            ids.append(node_id)
        return ids

    def _spawn(self, node_id: str, dedicated: bool) -> _LocalNode:
        assert self._scheduler is not None
        layout = NodeLayout(self.root / node_id)
        layout.root.mkdir(parents=True, exist_ok=True)  # exists when a node is restored
        (layout.root / STATE_FILE).unlink(missing_ok=True)
        NodeConfig(
            pool_id=self.pool_id,
            node_id=node_id,
            scheduler=self._scheduler,
            slots=self.spec.slots_per_node,
            env=dict(self.spec.env),
            start_task=self._start_task_argv,
            start_task_timeout=self.spec.start_task_timeout,
            resource_files=[list(pair) for pair in self.spec.resource_files],
            packages=list(self.spec.packages),
            storage_options=dict(self.spec.storage_options),
            tls=dict(self.tls),
        ).dump(layout.root / CONFIG_FILE)
        with (layout.root / "agent.log").open("ab") as log:  # a restored node appends
            process = subprocess.Popen(
                [sys.executable, "-m", "cloudmap.node", str(layout.root)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_node_environment(),
                start_new_session=True,
            )
        return _LocalNode(node_id, dedicated, layout, process, time.time())

    def list_nodes(self) -> list[ProviderNode]:
        with self._lock:
            nodes = list(self._nodes.values())
        return [self._describe(node) for node in nodes]

    def _describe(self, node: _LocalNode) -> ProviderNode:
        record = node.layout.read_state() or {"state": "creating", "since": node.created}
        state = record["state"]
        exited = node.process.poll() is not None
        if node.preempted_since is not None:
            record = {**record, "state": "preempted", "since": node.preempted_since}
            state = "preempted"
        elif node.leaving_since is not None:
            record = {**record, "state": "leaving", "since": node.leaving_since}
            state = "leaving"
        elif exited and state not in ("start_failed", "leaving"):
            state = "unusable"
        start_task = None
        prepares = (
            self._start_task_argv is not None or self.spec.resource_files or self.spec.packages
        )
        if prepares and state != "creating":
            stdout, stderr = node.layout.read_start_task_output()
            start_task = StartTaskInfo(record.get("start_task_exit_code"), stdout, stderr)
        return ProviderNode(
            id=node.id,
            state=state,
            dedicated=node.dedicated,
            slots=self.spec.slots_per_node,
            since=datetime.fromtimestamp(record["since"], tz=timezone.utc),
            start_task=start_task,
            restoring=state == "preempted" and self.restore_after is not None,
            reason=record.get("reason") if state == "unusable" else None,
        )

    def remove_nodes(self, node_ids: Sequence[str]) -> None:
        with self._lock:
            nodes = [self._nodes.pop(i) for i in node_ids if i in self._nodes]
        for node in nodes:
            if node.process.poll() is None:
                self.events.lost(node.id)
            _kill_tree(node.process)

    # -- spot nodes ------------------------------------------------------------------------

    def preempt(self, node_id: str, *, notice: float = 0.0) -> None:
        """Evict a spot node as the cloud would: after ``notice`` seconds in which it takes
        no new task, its processes are killed (SIGKILL) and it shows as ``preempted``.

        Tasks still running on it are requeued without spending their retries.
        """
        if isinstance(notice, bool) or not isinstance(notice, (int, float)) or notice < 0:
            raise InputError(f"notice={notice!r} is not valid: pass a number of seconds >= 0")
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                known = ", ".join(self._nodes) or "none"
                raise InputError(
                    f"there is no node {node_id!r} in this pool (its nodes: {known}); "
                    "see pool.nodes() for the ids"
                )
            if node.dedicated:
                raise InputError(
                    f"{node_id} is a dedicated node, and only spot nodes are preempted; "
                    "add spot nodes with Pool(spot_nodes=...) or pool.resize(spot_nodes=...)"
                )
            if node.preempted_since is not None or node.leaving_since is not None:
                raise InputError(f"{node_id} is already preempted or being preempted")
            if not notice:
                node.preempted_since = time.time()  # claimed under the lock: evicted once
            else:
                node.leaving_since = time.time()
        if notice:
            self.events.draining(node_id)
            self._later(notice, self._evict, node)
        else:
            self._evict(node)

    def _evict(self, node: _LocalNode) -> None:
        with self._lock:
            if self._nodes.get(node.id) is not node or self._closed:
                return  # removed meanwhile
        self.events.lost(node.id)
        _kill_tree(node.process)
        with self._lock:
            node.preempted_since = node.preempted_since or time.time()
            node.leaving_since = None
            self.preemptions.append((node.preempted_since, node.id))
        if self.restore_after is not None:
            self._later(self.restore_after, self._restore, node)

    def _restore(self, node: _LocalNode) -> None:
        """Bring a preempted node back under its id, as Batch does when capacity returns."""
        with self._lock:
            if self._closed or self._nodes.get(node.id) is not node:
                return
        restored = self._spawn(node.id, node.dedicated)
        with self._lock:
            if self._closed or self._nodes.get(node.id) is not node:
                _kill_tree(restored.process)
                return
            self._nodes[node.id] = restored

    def _evictable(self) -> list[str]:
        with self._lock:
            return [
                node.id
                for node in self._nodes.values()
                if not node.dedicated
                and node.leaving_since is None
                and node.preempted_since is None
            ]

    def _preempt_at_random(self, node_id: str, notice: float) -> None:
        self.preempt(node_id, notice=notice)

    def _later(self, seconds: float, action: Any, node: _LocalNode) -> None:
        timer = threading.Timer(seconds, action, (node,))
        timer.daemon = True
        with self._lock:
            if self._closed:
                return
            self._timers = [t for t in self._timers if t.is_alive()]
            self._timers.append(timer)
        timer.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, []
        if self._evictions is not None:
            self._evictions.stop()
        for timer in timers:
            timer.cancel()
        with self._lock:
            nodes = list(self._nodes.values())
            self._nodes.clear()
        for node in nodes:  # ask all to stop first, so they stop in parallel
            _close_quietly(node.process.stdin)
        deadline = time.monotonic() + STOP_GRACE + 2.0
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(max(0.0, deadline - time.monotonic()))
            _kill_tree(node.process)
        if not self.keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def read_file(self, node_id: str, path: str) -> bytes:
        with self._lock:
            node = self._nodes.get(node_id)
        if node is None:
            raise InputError(f"there is no node {node_id!r} in this pool; see pool.nodes()")
        root = node.layout.root.resolve()
        target = (root / path).resolve()  # an absolute path inside the node works too
        if root not in target.parents:
            raise InputError(f"{path!r} is outside the node's directory; pass a path inside it")
        try:
            return target.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{node_id} has no file {path!r} (under {root})") from None

    def node_root(self, node_id: str) -> Path:
        """The node's directory on this machine (``CLOUDMAP_NODE_ROOT_DIR``)."""
        with self._lock:
            return self._nodes[node_id].layout.root


def _node_environment() -> dict[str, str]:
    """The client's environment, with its import path, so functions pickled by reference
    (defined in the user's modules) import on the nodes as they do here."""
    env = dict(os.environ)
    paths = [os.path.abspath(p or os.getcwd()) for p in sys.path]  # nodes run elsewhere
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _close_quietly(stream: Any) -> None:
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """Kill the node's whole process group (agent, start task, slots) and every process
    under the agent that left the group (MPICH's hydra puts each MPI rank in a group of
    its own), then reap the agent. A killed node leaves nothing running, as a VM would."""
    import psutil

    try:
        strays = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        strays = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for stray in strays:
        with contextlib.suppress(psutil.Error):
            stray.kill()
    process.wait()
