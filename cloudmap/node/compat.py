"""Does this node run what the client runs? Checked once, before a node joins.

A map's function and its items travel pickled by cloudpickle, and a node unpickles them
with its own Python and its own cloudmap. Functions pickled by value carry bytecode, which
only the same Python minor version can run, and the task and result formats are
cloudmap's own. A node that differs fails in ways that do not name the cause (a
``SystemError`` deep in unpickling, a missing attribute), so such a node refuses to start
and says why. Local nodes run the client's own interpreter; Azure Batch nodes run what
the image or ``install=`` gave them, which is where the two part.
"""

from __future__ import annotations

import sys

import cloudmap


def versions() -> dict[str, str]:
    """What must match between client and nodes: Python's minor version and cloudmap's."""
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return {"python": python, "cloudmap": str(cloudmap.__version__)}


def mismatch(client: dict[str, str]) -> str | None:
    """Why this node cannot serve a client with these ``versions()``, or None if it can."""
    here = versions()
    differ = [name for name in ("python", "cloudmap") if client.get(name) != here[name]]
    if not differ:
        return None
    parts = ", ".join(f"{name} {client.get(name)} (node: {here[name]})" for name in differ)
    return (
        f"this node cannot run the client's tasks: the client runs {parts}. Give the nodes "
        "the client's versions: an image with that Python, and install= naming a cloudmap "
        f"{client.get('cloudmap')} wheel or git URL"
    )
