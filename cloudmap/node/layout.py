"""A node's directories and the variables that expose them, like Batch's AZ_BATCH_NODE_*."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
CONFIG_FILE = "node.json"
#: Left in ``slots/slot-<n>/`` by a slot once it has joined the scheduler.
JOINED_MARKER = "joined"


@dataclass(frozen=True)
class NodeLayout:
    """Where a node keeps things. ``root`` is ``CLOUDMAP_NODE_ROOT_DIR``.

    - ``shared/``: for all tasks of all jobs (``CLOUDMAP_NODE_SHARED_DIR``)
    - ``startup/``: the start task's working directory, with ``stdout.txt`` and ``stderr.txt``
    - ``tasks/``: tasks' working directory (``CLOUDMAP_NODE_TASKS_DIR``)
    - ``slots/``: each slot's Dask scratch space and log
    """

    root: Path

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def startup(self) -> Path:
        return self.root / "startup"

    @property
    def tasks(self) -> Path:
        return self.root / "tasks"

    @property
    def slots(self) -> Path:
        return self.root / "slots"

    def slot_joined(self, slot: int) -> bool:
        """Whether slot number ``slot`` has joined the scheduler since it last started."""
        return (self.slots / f"slot-{slot}" / JOINED_MARKER).exists()

    def make(self) -> None:
        for directory in (self.shared, self.startup, self.tasks, self.slots):
            directory.mkdir(parents=True, exist_ok=True)

    def environment(self, pool_id: str, node_id: str) -> dict[str, str]:
        """The variables every start task and slot on this node sees."""
        return {
            "CLOUDMAP_POOL_ID": pool_id,
            "CLOUDMAP_NODE_ID": node_id,
            "CLOUDMAP_NODE_ROOT_DIR": str(self.root),
            "CLOUDMAP_NODE_SHARED_DIR": str(self.shared),
            "CLOUDMAP_NODE_STARTUP_DIR": str(self.startup),
            "CLOUDMAP_NODE_TASKS_DIR": str(self.tasks),
        }

    def write_state(self, state: str, **details: Any) -> None:
        """Publish the agent's state for the provider, atomically (write, then rename)."""
        record = {"state": state, "since": time.time(), **details}
        temporary = self.root / f".{STATE_FILE}.{os.getpid()}"
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self.root / STATE_FILE)

    def read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None

    def read_start_task_output(self, limit: int = 65536) -> tuple[str, str]:
        """The tail of the start task's stdout and stderr (empty when it did not run)."""
        return (
            _tail(self.startup / "stdout.txt", limit),
            _tail(self.startup / "stderr.txt", limit),
        )


def _tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""
