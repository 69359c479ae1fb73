"""Makes ``"cloudmap"`` a joblib backend name as soon as both cloudmap and joblib are imported.

After ``import cloudmap``, ``parallel_config(backend="cloudmap")`` should just work; but
importing joblib costs about 0.1 s and loads numpy, and node agents (which import
``cloudmap`` too) must start without either (``tests/test_import_graph.py``). joblib has no
entry points for backends. So ``import cloudmap`` does one of two cheap things:

- joblib is already imported: register now;
- otherwise: put a finder at the front of ``sys.meta_path`` that finds nothing itself, but
  when ``joblib`` is being imported, wraps the real loader so that the registration runs
  right after joblib's ``__init__`` (which imports ``joblib.parallel``), then leaves.
  This is the "post-import hook" pattern (as in ``wrapt.register_post_import_hook``).

Either way what joblib gets is a small factory: :mod:`cloudmap.joblib_backend` (and through
it Dask) is imported only when a ``Parallel`` call or ``parallel_config`` actually asks for
the ``"cloudmap"`` backend. A process that never imports joblib pays one string comparison
per first import of a module.
"""

from __future__ import annotations

import sys
from typing import Any

#: The name joblib knows the backend by: ``parallel_config(backend="cloudmap")``.
BACKEND_NAME = "cloudmap"


def make_backend(**options: Any) -> Any:
    """The factory joblib calls for ``backend="cloudmap"`` (imports the backend on first use)."""
    from .joblib_backend import CloudmapBackend

    return CloudmapBackend(**options)


def register(parallel: Any) -> None:
    """Register the backend with the ``joblib.parallel`` module given."""
    parallel.register_parallel_backend(BACKEND_NAME, make_backend)


class _Loader:
    """Runs joblib's own loader, then registers; afterwards joblib's module names its own
    loader again, so nothing later (``importlib.reload``, resources, inspect) sees this one."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        parallel = sys.modules.get("joblib.parallel")
        if parallel is not None:
            register(parallel)
            _remove_watcher()


class _JoblibWatcher:
    """A ``sys.meta_path`` finder that only watches for ``import joblib`` (see the module)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "joblib":
            return None
        # Stays in place until joblib has run: importlib.util.find_spec("joblib") (a check
        # that joblib is installed) also lands here, and imports nothing.
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None or isinstance(finder, _JoblibWatcher):
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None  # joblib is not installed: the import fails as it would have
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


def _remove_watcher() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _JoblibWatcher)]


def install() -> None:
    """Called by ``import cloudmap``: register with joblib now or when it is imported."""
    parallel = sys.modules.get("joblib.parallel")
    if hasattr(parallel, "register_parallel_backend"):
        register(parallel)
    elif not any(isinstance(f, _JoblibWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _JoblibWatcher())
