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
from importlib import metadata

import cloudmap

#: What a node imports to run tasks, besides cloudmap: the client's versions must be there.
NODE_REQUIREMENTS = ("dask", "distributed", "cloudpickle", "numpy", "fsspec")


def versions() -> dict[str, str]:
    """What must match between client and nodes: Python's minor version, cloudmap's, and
    those of :data:`NODE_REQUIREMENTS` ("none" where one is missing)."""
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = {"python": python, "cloudmap": str(cloudmap.__version__)}
    for name in NODE_REQUIREMENTS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "none"
    return found


def mismatch(client: dict[str, str]) -> str | None:
    """Why this node cannot serve a client with these ``versions()``, or None if it can.
    Only what the client named is compared (an older client names fewer)."""
    here = versions()
    differ = [name for name in client if name in here and client[name] != here[name]]
    if not differ:
        return None
    parts = ", ".join(f"{name} {client[name]} (node: {here[name]})" for name in differ)
    return (
        f"this node cannot run the client's tasks: the client runs {parts}. Give the nodes "
        "the client's versions: staging_url= ships them (or an image with that Python, and "
        f"install= naming a cloudmap {client.get('cloudmap')} wheel or git URL, and matching "
        "packages)"
    )
