"""The provider conformance suite: behaviour tests written once, run by every provider.

A provider's test module subclasses :class:`ProviderHarness` (the provider's name, its pool
options, its capabilities and its fault actions) and mixes it into each conformance class::

    from cloudmap.testing import MapTests, ProviderHarness

    class MyCloudHarness(ProviderHarness):
        provider = "mycloud"
        capabilities = frozenset({"spot", "preempt"})

        def preempt(self, pool, node_id, *, notice=None): ...

    class TestMap(MyCloudHarness, MapTests):
        pass

Tests needing a capability the harness does not declare are skipped, naming it
(:data:`CAPABILITIES` lists them all). Needs pytest and psutil (the ``test`` extra).

Names are imported lazily: the nodes import :mod:`cloudmap.testing.tasks`, the functions the
tests run, and must not load pytest for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CAPABILITIES": "cloudmap.testing.capabilities",
    "requires": "cloudmap.testing.capabilities",
    "MissingCapabilityError": "cloudmap.testing.harness",
    "ProviderHarness": "cloudmap.testing.harness",
    "BadInputTests": "cloudmap.testing.bad_input",
    "ElasticInputTests": "cloudmap.testing.elastic_input",
    "ElasticTests": "cloudmap.testing.elastic",
    "FaultTests": "cloudmap.testing.faults",
    "JobTests": "cloudmap.testing.jobs",
    "MapTests": "cloudmap.testing.maps",
    "MpiTests": "cloudmap.testing.mpi",
    "NodeSetupTests": "cloudmap.testing.node_setup",
    "StartTaskTests": "cloudmap.testing.start_task",
    "StorageTests": "cloudmap.testing.storage",
}

__all__ = [
    "CAPABILITIES",
    "BadInputTests",
    "ElasticInputTests",
    "ElasticTests",
    "FaultTests",
    "JobTests",
    "MapTests",
    "MissingCapabilityError",
    "MpiTests",
    "NodeSetupTests",
    "ProviderHarness",
    "StartTaskTests",
    "StorageTests",
    "requires",
]

if TYPE_CHECKING:
    from .bad_input import BadInputTests
    from .capabilities import CAPABILITIES, requires
    from .elastic import ElasticTests
    from .elastic_input import ElasticInputTests
    from .faults import FaultTests
    from .harness import MissingCapabilityError, ProviderHarness
    from .jobs import JobTests
    from .maps import MapTests
    from .mpi import MpiTests
    from .node_setup import NodeSetupTests
    from .start_task import StartTaskTests
    from .storage import StorageTests


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cloudmap.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
