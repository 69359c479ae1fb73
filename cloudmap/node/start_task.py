"""Runs a pool's start task given as a Python callable: ``python -m cloudmap.node.start_task FILE``.

The callable was pickled by the client; running it in its own process, like a shell start
task, keeps its output in ``startup/stdout.txt`` and its failure off the agent.
"""

from __future__ import annotations

import sys

import cloudpickle


def dump(start_task: object) -> bytes | None:
    """Pickle a callable start task for the nodes (None for a command string or none)."""
    if start_task is None or isinstance(start_task, str):
        return None
    try:
        return cloudpickle.dumps(start_task)
    except Exception as exc:
        from ..errors import SerializationError

        raise SerializationError(
            f"start_task={start_task!r} cannot be pickled to send to the nodes ({exc}); "
            "pass a module-level function or a shell command string"
        ) from exc


def command(path: str) -> list[str]:
    """The start task's argv on a node, once the pickle is at ``path``."""
    return [sys.executable, "-m", "cloudmap.node.start_task", path]


def main(path: str) -> int:
    with open(path, "rb") as handle:
        task = cloudpickle.load(handle)
    result = task()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
