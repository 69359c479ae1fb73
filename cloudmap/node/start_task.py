"""Runs a pool's start task given as a Python callable: ``python -m cloudmap.node.start_task FILE``.

The callable was pickled by the client; running it in its own process, like a shell start
task, keeps its output in ``startup/stdout.txt`` and its failure off the agent.
"""

from __future__ import annotations

import sys

import cloudpickle


def main(path: str) -> int:
    with open(path, "rb") as handle:
        task = cloudpickle.load(handle)
    result = task()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
