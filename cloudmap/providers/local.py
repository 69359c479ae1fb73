"""The local provider: each node is a process tree on this machine (the default provider).

A node is ``python -m cloudmap.node DIR``, a node agent in its own session (so the whole tree
can be killed at once) with its own directory under one temporary pool directory. The agent
holds a pipe from us on its stdin and stops when it closes, so nodes die with the client.
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

import cloudpickle

from ..errors import SerializationError
from ..node.agent import STOP_GRACE, NodeConfig
from ..node.layout import CONFIG_FILE, NodeLayout
from ..nodes import ProviderNode, StartTaskInfo
from .base import PoolSpec, Provider


@dataclass
class _LocalNode:
    id: str
    dedicated: bool
    layout: NodeLayout
    process: subprocess.Popen[bytes]
    created: float


class LocalProvider(Provider):
    """Nodes as local processes. Options: ``root=`` (a directory for the node directories,
    default a new temporary one) and ``keep_files=True`` to keep it after ``close()``."""

    name = "local"
    option_names = ("root", "keep_files")

    def __init__(
        self,
        spec: PoolSpec,
        *,
        root: str | None = None,
        keep_files: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(spec, **options)
        pickled_start_task = _pickle_start_task(spec.start_task)  # before making anything
        self.pool_id = f"local-{uuid.uuid4().hex[:8]}"
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="cloudmap-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_files = keep_files
        self._nodes: dict[str, _LocalNode] = {}
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._scheduler: str | None = None
        self._start_task_argv = self._start_task_command(spec, pickled_start_task)

    def describe(self) -> str:
        return f"local processes in {self.root}"

    def _start_task_command(self, spec: PoolSpec, pickled: bytes | None) -> list[str] | None:
        """The command line each node agent runs as the start task."""
        if isinstance(spec.start_task, str):
            return ["/bin/sh", "-c", spec.start_task]
        if pickled is None:
            return None
        path = self.root / "start_task.pkl"
        path.write_bytes(pickled)
        return [sys.executable, "-m", "cloudmap.node.start_task", str(path)]

    def start(self, scheduler_address: str) -> None:
        self._scheduler = scheduler_address
        self.add_nodes(self.spec.nodes)

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
        layout.root.mkdir(parents=True)
        NodeConfig(
            pool_id=self.pool_id,
            node_id=node_id,
            scheduler=self._scheduler,
            slots=self.spec.slots_per_node,
            env=dict(self.spec.env),
            start_task=self._start_task_argv,
            start_task_timeout=self.spec.start_task_timeout,
        ).dump(layout.root / CONFIG_FILE)
        with (layout.root / "agent.log").open("wb") as log:
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
        if exited and state not in ("start_failed", "leaving"):
            state = "unusable"
        start_task = None
        if self._start_task_argv is not None and state != "creating":
            stdout, stderr = node.layout.read_start_task_output()
            start_task = StartTaskInfo(record.get("start_task_exit_code"), stdout, stderr)
        return ProviderNode(
            id=node.id,
            state=state,
            dedicated=node.dedicated,
            slots=self.spec.slots_per_node,
            since=datetime.fromtimestamp(record["since"], tz=timezone.utc),
            start_task=start_task,
        )

    def remove_nodes(self, node_ids: Sequence[str]) -> None:
        with self._lock:
            nodes = [self._nodes.pop(i) for i in node_ids if i in self._nodes]
        for node in nodes:  # ask all to stop first, so they stop in parallel
            _close_quietly(node.process.stdin)
        deadline = time.monotonic() + STOP_GRACE + 2.0
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(max(0.0, deadline - time.monotonic()))
            _kill_tree(node.process)

    def close(self) -> None:
        with self._lock:
            ids = list(self._nodes)
        self.remove_nodes(ids)
        if not self.keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def node_root(self, node_id: str) -> Path:
        """The node's directory on this machine (``CLOUDMAP_NODE_ROOT_DIR``)."""
        with self._lock:
            return self._nodes[node_id].layout.root


def _pickle_start_task(start_task: object) -> bytes | None:
    if start_task is None or isinstance(start_task, str):
        return None
    try:
        return cloudpickle.dumps(start_task)
    except Exception as exc:
        raise SerializationError(
            f"start_task={start_task!r} cannot be pickled to send to the nodes ({exc}); "
            "pass a module-level function or a shell command string"
        ) from exc


def _node_environment() -> dict[str, str]:
    """The client's environment, with its import path, so functions pickled by reference
    (defined in the user's modules) import on the nodes as they do here."""
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]
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
    """Kill the node's whole session (agent, start task, slots), then reap the agent."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
