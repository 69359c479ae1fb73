"""cloudmap: the Azure Batch model in your notebook.

A :class:`Pool` of compute nodes (local processes by default) runs your Python functions
with ``map``, ``imap`` and ``submit``, on a Dask cluster whose workers live on the nodes.

Names are imported lazily so that a node agent, which imports ``cloudmap.node``, starts
without loading Dask.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import joblib_registration

__version__ = "0.1.0"

_EXPORTS = {
    "Pool": "cloudmap.pool",
    "Output": "cloudmap.staging",
    "CommandResult": "cloudmap.commands",
    "CommandError": "cloudmap.errors",
    "StagingError": "cloudmap.errors",
    "JobPreparationError": "cloudmap.errors",
    "JobReleaseError": "cloudmap.errors",
    "MpiResult": "cloudmap.mpi",
    "MapRun": "cloudmap.runs",
    "MapResult": "cloudmap.record",
    "RunRecord": "cloudmap.record",
    "rerun": "cloudmap.record",
    "MpiError": "cloudmap.errors",
    "MpiTimeoutError": "cloudmap.errors",
    "MpiUnavailableError": "cloudmap.errors",
    "Autoscale": "cloudmap.autoscale",
    "Eviction": "cloudmap.providers.eviction",
    "ScalingSample": "cloudmap.samples",
    "Shared": "cloudmap.share",
    "SharedDataError": "cloudmap.errors",
    "LargeFunctionWarning": "cloudmap.payload",
    "TaskCounts": "cloudmap.samples",
    "NodePrices": "cloudmap.pricing",
    "PoolWidget": "cloudmap.widgets.pool_widget",
    "ProgressWidget": "cloudmap.widgets.progress_widget",
    "FuturesWatch": "cloudmap.watching",
    "Future": "cloudmap.futures",
    "PoolExecutor": "cloudmap.futures",
    "NodeInfo": "cloudmap.nodes",
    "NodeState": "cloudmap.nodes",
    "StartTaskInfo": "cloudmap.nodes",
    "ProgressCounts": "cloudmap.progress",
    "ProgressReporter": "cloudmap.progress",
    "item_rng": "cloudmap.seeding",
    "CloudmapError": "cloudmap.errors",
    "InputError": "cloudmap.errors",
    "NoNodesError": "cloudmap.errors",
    "PoolClosedError": "cloudmap.errors",
    "PoolStartError": "cloudmap.errors",
    "RemoteException": "cloudmap.errors",
    "SchedulerLostError": "cloudmap.errors",
    "SerializationError": "cloudmap.errors",
    "TaskError": "cloudmap.errors",
    "TaskTimeoutError": "cloudmap.errors",
    "UnknownProviderError": "cloudmap.errors",
    "WorkerLostError": "cloudmap.errors",
    "current_pool": "cloudmap.module_api",
    "imap": "cloudmap.module_api",
    "map": "cloudmap.module_api",
    "map_async": "cloudmap.module_api",
    "submit": "cloudmap.module_api",
}

__all__ = [
    "Autoscale",
    "CloudmapError",
    "CommandError",
    "CommandResult",
    "Eviction",
    "Future",
    "FuturesWatch",
    "InputError",
    "JobPreparationError",
    "JobReleaseError",
    "LargeFunctionWarning",
    "MapResult",
    "MapRun",
    "MpiError",
    "MpiResult",
    "MpiTimeoutError",
    "MpiUnavailableError",
    "NoNodesError",
    "NodeInfo",
    "NodePrices",
    "NodeState",
    "Output",
    "Pool",
    "PoolClosedError",
    "PoolExecutor",
    "PoolStartError",
    "PoolWidget",
    "ProgressCounts",
    "ProgressReporter",
    "ProgressWidget",
    "RemoteException",
    "RunRecord",
    "ScalingSample",
    "SchedulerLostError",
    "SerializationError",
    "Shared",
    "SharedDataError",
    "StagingError",
    "StartTaskInfo",
    "TaskCounts",
    "TaskError",
    "TaskTimeoutError",
    "UnknownProviderError",
    "WorkerLostError",
    "current_pool",
    "item_rng",
    "rerun",
]
# Not in __all__: cloudmap.map, cloudmap.imap, cloudmap.submit (`from cloudmap import *` must
# not shadow the builtin map).

if TYPE_CHECKING:
    from .autoscale import Autoscale
    from .commands import CommandResult
    from .errors import (
        CloudmapError,
        CommandError,
        InputError,
        JobPreparationError,
        JobReleaseError,
        MpiError,
        MpiTimeoutError,
        MpiUnavailableError,
        NoNodesError,
        PoolClosedError,
        PoolStartError,
        RemoteException,
        SchedulerLostError,
        SerializationError,
        SharedDataError,
        StagingError,
        TaskError,
        TaskTimeoutError,
        UnknownProviderError,
        WorkerLostError,
    )
    from .futures import Future, PoolExecutor
    from .module_api import current_pool
    from .module_api import imap as imap
    from .module_api import map as map
    from .module_api import map_async as map_async
    from .module_api import submit as submit
    from .mpi import MpiResult
    from .nodes import NodeInfo, NodeState, StartTaskInfo
    from .payload import LargeFunctionWarning
    from .pool import Pool
    from .pricing import NodePrices
    from .progress import ProgressCounts, ProgressReporter
    from .providers.eviction import Eviction
    from .record import MapResult, RunRecord, rerun
    from .runs import MapRun
    from .samples import ScalingSample, TaskCounts
    from .seeding import item_rng
    from .share import Shared
    from .staging import Output
    from .watching import FuturesWatch
    from .widgets.pool_widget import PoolWidget
    from .widgets.progress_widget import ProgressWidget

# joblib learns the name "cloudmap" now, or when it is imported (without importing it here).
joblib_registration.install()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cloudmap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
