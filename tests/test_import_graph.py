"""cloudmap's modules import each other without a cycle, so that each layer can be read,
tested and changed without the ones above it (shared/DESIGN.md: arrows point down only).

Every import counts: at module level, inside functions (lazy) and under TYPE_CHECKING, since
each is a dependency a reader must follow. A submodule's dependency on its own parent
packages is Python's doing (importing ``cloudmap.node.agent`` runs ``cloudmap/__init__``),
not the design's, and is left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cloudmap

PACKAGE = Path(cloudmap.__file__).parent


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from . import x``: module x)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names}
            named = submodules & modules
            found.update(named)
            if len(named) < len(submodules):  # some names are the module's attributes
                found.add(target)
    ancestors = {".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 1)}
    return {m for m in found if m in modules and m != name and m not in ancestors}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {name: imported_modules(name, path, names) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_cloudmaps_modules() -> None:
    graph = import_graph()
    found = cycles(graph)
    explained = [
        " -> ".join(group)
        + "\n    "
        + "\n    ".join(f"{m} imports {', '.join(sorted(graph[m] & set(group)))}" for m in group)
        for group in found
    ]
    assert not found, "import cycles:\n" + "\n".join(explained)


def test_the_walker_finds_a_cycle_and_reads_relative_imports() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "cloudmap.scheduler_plugin" in graph["cloudmap.cluster"]  # from . import x as y
    assert "cloudmap.node.runner" in graph["cloudmap.cluster"]  # from .node.runner import
    assert "cloudmap.errors" in graph["cloudmap.node.job_steps"]  # from ..errors import


def test_import_cloudmap_stays_light() -> None:
    """``import cloudmap`` loads no Dask, numpy or widgets: names are imported on first use."""
    code = (
        "import sys, cloudmap; "
        "print(sorted(m for m in ('dask', 'distributed', 'numpy', 'ipywidgets') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"


#: The cluster layer: the only modules that may import ``distributed`` (the scheduler glue,
#: cloudmap's scheduler plugin, the slot runner, the slot process that is a Dask worker, and
#: the process that is the scheduler on a pool node).
DASK_LAYER = {
    "cloudmap.cluster",
    "cloudmap.scheduler_plugin",
    "cloudmap.node.runner",
    "cloudmap.node.slot",
    "cloudmap.node.scheduler",
}


def test_only_the_cluster_layer_imports_distributed() -> None:
    importers = set()
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            if "distributed" in roots:
                importers.add(name)
    # The conformance suite uses distributed.Client(pool) as a user would: it is not a layer.
    outside = {m for m in importers - DASK_LAYER if not m.startswith("cloudmap.testing")}
    assert outside == set(), "Dask's internals belong to the cluster layer"
    assert "cloudmap.cluster" in importers
