"""Providers by name: a registry of lazy ``"module:Class"`` strings, open to other packages.

Other packages add providers through the ``cloudmap.providers`` entry-point group, or at run
time with :func:`register_provider`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..errors import UnknownProviderError
from .base import PoolSpec, Provider

__all__ = ["PoolSpec", "Provider", "get_provider", "known_providers", "register_provider"]

ENTRY_POINT_GROUP = "cloudmap.providers"

#: name -> ("module:Class", pip extra to suggest when its import fails)
_registry: dict[str, tuple[str, str | None]] = {
    "local": ("cloudmap.providers.local:LocalProvider", None),
    "azure": ("cloudmap.providers.azure:AzureBatchProvider", "azure"),
}


def register_provider(name: str, target: str, *, extra: str | None = None) -> None:
    """Make ``Pool(name)`` use the class at ``target`` ("module:Class")."""
    _registry[name] = (target, extra)


def known_providers() -> list[str]:
    names = set(_registry)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def get_provider(name: str) -> type[Provider]:
    """Import and return the provider class registered as ``name``."""
    if name in _registry:
        target, extra = _registry[name]
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise UnknownProviderError(
                f"no provider named {name!r}; known providers: {', '.join(known_providers())}"
            )
        target, extra = found[0].value, None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f'; install it with pip install "cloudmap[{extra}]"' if extra else ""
        raise ImportError(f"the {name!r} provider needs {exc.name or exc}{hint}") from exc
    provider: type[Provider] = getattr(module, class_name)
    return provider
