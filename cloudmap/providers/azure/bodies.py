"""The JSON bodies the Azure provider sends to Batch, built from plain values.

Pure functions: ``plan`` prints them without credentials or a network, and the provider
sends the same dicts through the SDK (its models take Batch's camelCase JSON as is).
Secrets (slot certificates, storage keys) travel in the start task's environment
settings, never on its command line, and :func:`redacted` hides them for display.
"""

from __future__ import annotations

import base64
import json
import math
import socket
from datetime import datetime, timezone
from typing import Any

from ... import __version__
from ...autoscale import Autoscale
from ...node import compat
from ...node import start_task as start_task_pickle
from ..base import PoolSpec
from .settings import FRONTEND_RANGE, AzureSettings
from .shipping import ShippedEnvironment

#: Environment settings of the start task.
CONFIG_VARIABLE = "CLOUDMAP_NODE_CONFIG"  # base64 JSON of the node configuration; secret
PYTHON_VARIABLE = "CLOUDMAP_PYTHON"
INSTALL_VARIABLE = "CLOUDMAP_INSTALL"
SHIP_WHEELS_VARIABLE = "CLOUDMAP_SHIP_WHEELS"  # file names of the shipped wheels
SHIP_REQUIREMENTS_VARIABLE = "CLOUDMAP_SHIP_REQUIREMENTS"  # the pinned requirements
SECRET_VARIABLES = frozenset({CONFIG_VARIABLE})
#: The name of the inbound NAT pool that exposes a node's scheduler.
SCHEDULER_ENDPOINT = "cloudmap-scheduler"
#: Pool metadata that marks a pool as made by cloudmap (``python -m cloudmap pools list``).
TAG = "cloudmap"

#: Runs on each node: install the shipped environment, or find (or install) cloudmap, then
#: hand over to its Batch bootstrap, which starts the node agent and exits with the user's
#: start task's outcome. A shipped environment is a virtual environment of the node's own:
#: the shipped wheels (resource files, in the start task's directory) without their
#: dependencies, then the pinned requirements. ``set -f``: a requirement's brackets are
#: not file patterns.
BOOTSTRAP = (
    'set -f; PY="${CLOUDMAP_PYTHON:-python3}"; '
    'ENV="$AZ_BATCH_NODE_SHARED_DIR/cloudmap-env"; '
    'PIP="-m pip install --quiet --disable-pip-version-check"; '
    'if [ -n "$CLOUDMAP_SHIP_WHEELS" ]; then '
    '"$PY" -m venv "$ENV" && PY="$ENV/bin/python" && '
    '"$PY" $PIP --no-deps $CLOUDMAP_SHIP_WHEELS && "$PY" $PIP $CLOUDMAP_SHIP_REQUIREMENTS '
    "|| exit 90; "
    'elif ! "$PY" -c "import cloudmap.node.batch_boot" 2>/dev/null; then '
    '[ -n "$CLOUDMAP_INSTALL" ] || { echo "cloudmap is not installed for $PY on this image '
    'and neither staging_url= nor install= was given" >&2; exit 90; }; '
    '"$PY" -m venv "$ENV" && PY="$ENV/bin/python" && '
    '"$PY" $PIP "$CLOUDMAP_INSTALL" || exit 90; '
    "fi; "
    'exec "$PY" -m cloudmap.node.batch_boot'
)


def start_task_command() -> str:
    """The start task's command line: a shell, since Batch does not run one by itself."""
    return f"/bin/sh -c '{BOOTSTRAP}'"


def node_config(spec: PoolSpec, scheduler: str, tls: dict[str, str], pool_id: str) -> str:
    """What every node's agent needs, base64 JSON (the node id comes from Batch on the node)."""
    start_task: list[str] | None = None
    if isinstance(spec.start_task, str):
        start_task = ["/bin/sh", "-c", spec.start_task]
    pickled = start_task_pickle.dump(spec.start_task)  # a callable: run by the agent
    config = {
        "start_task_pickle": base64.b64encode(pickled).decode() if pickled else None,
        "pool_id": pool_id,
        "scheduler": scheduler,
        "slots": spec.slots_per_node,
        "env": dict(spec.env),
        "start_task": start_task,
        "start_task_timeout": spec.start_task_timeout,
        "resource_files": [list(pair) for pair in spec.resource_files],
        "packages": list(spec.packages),
        "storage_options": dict(spec.storage_options),
        "tls": dict(tls),
        "client_versions": compat.versions(),  # a node that differs refuses to start
    }
    return base64.b64encode(json.dumps(config).encode()).decode()


def scheduler_node_config(tls: dict[str, str], port: int, pool_id: str) -> str:
    """The configuration of the node that hosts the pool's scheduler (base64 JSON): it
    starts ``cloudmap.node.scheduler`` on ``port`` instead of a node agent and slots."""
    config = {
        "role": "scheduler",
        "pool_id": pool_id,
        "scheduler_port": port,
        "tls": dict(tls),
        "client_versions": compat.versions(),
    }
    return base64.b64encode(json.dumps(config).encode()).decode()


def scheduler_pool_body(
    spec: PoolSpec,
    settings: AzureSettings,
    *,
    pool_id: str,
    tls: dict[str, str],
    shipped: ShippedEnvironment | None,
) -> dict[str, Any]:
    """The first "add pool" body of a pool whose scheduler runs on a node: that node
    alone, with the scheduler's start task (the slots' one replaces it once it listens)."""
    config = scheduler_node_config(tls, settings.backend_port, pool_id)
    return pool_body(
        spec, settings, pool_id=pool_id, config=config, shipped=shipped, targets=(1, 0)
    )


def scheduler_endpoint(settings: AzureSettings) -> dict[str, Any]:
    """Batch's ``endpointConfiguration`` for a scheduler on a node: one inbound NAT pool
    from the pool's public address to the scheduler's port, open only to ``allow_from``
    (then everything else denied: without rules, Batch would allow every source)."""
    assert settings.allow_from
    rules = [
        {
            "priority": 150 + index,
            "access": "allow",
            "sourceAddressPrefix": source,
            "sourcePortRanges": ["*"],
        }
        for index, source in enumerate(settings.allow_from)
    ]
    rules.append(
        {"priority": 4096, "access": "deny", "sourceAddressPrefix": "*", "sourcePortRanges": ["*"]}
    )
    return {
        "inboundNATPools": [
            {
                "name": SCHEDULER_ENDPOINT,
                "protocol": "tcp",
                "backendPort": settings.backend_port,
                "frontendPortRangeStart": settings.frontend_port,
                "frontendPortRangeEnd": settings.frontend_port + FRONTEND_RANGE - 1,
                "networkSecurityGroupRules": rules,
            }
        ]
    }


def pool_body(
    spec: PoolSpec,
    settings: AzureSettings,
    *,
    pool_id: str,
    config: str,
    shipped: ShippedEnvironment | None = None,
    targets: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The body of Batch's "add pool" request (``BatchPoolCreateOptions``).

    ``targets`` (dedicated, spot) replace the spec's (the scheduler's node, first).
    ``settings.mpi`` makes an MPI pool as Batch wants one: inter-node communication on and
    one Batch task slot per node (cloudmap's own slots, the Dask workers, are unchanged).
    """
    mpi = settings.mpi
    on_node = settings.scheduler_on_node
    body: dict[str, Any] = {
        "id": pool_id,
        "displayName": f"cloudmap pool {pool_id}",
        "vmSize": settings.vm_size,
        "virtualMachineConfiguration": {
            "imageReference": dict(settings.image),
            "nodeAgentSKUId": settings.node_agent_sku_id,
        },
        "taskSlotsPerNode": 1 if mpi else spec.slots_per_node,
        "targetDedicatedNodes": spec.nodes if targets is None else targets[0],
        "targetLowPriorityNodes": spec.spot_nodes if targets is None else targets[1],
        "resizeTimeout": iso_duration(settings.resize_timeout),
        # The scheduler's node and the slots talk over the pool's network.
        "enableInterNodeCommunication": mpi or on_node,
        "startTask": {
            "commandLine": start_task_command(),
            "environmentSettings": [
                {"name": PYTHON_VARIABLE, "value": settings.python},
                {"name": INSTALL_VARIABLE, "value": settings.install or ""},
                {"name": CONFIG_VARIABLE, "value": config},
            ],
            "userIdentity": {"autoUser": {"scope": "pool", "elevationLevel": "nonadmin"}},
            "maxTaskRetryCount": 0,
            "waitForSuccess": True,
        },
        "metadata": [
            {"name": TAG, "value": __version__},
            {"name": "cloudmap-created", "value": datetime.now(timezone.utc).isoformat()},
            {"name": "cloudmap-client", "value": socket.gethostname()},
        ],
    }
    if shipped is not None:
        start_task = body["startTask"]
        start_task["resourceFiles"] = [
            {"httpUrl": url, "filePath": path} for url, path in shipped.resource_files
        ]
        start_task["environmentSettings"] += [
            {"name": SHIP_WHEELS_VARIABLE, "value": " ".join(shipped.wheels)},
            {"name": SHIP_REQUIREMENTS_VARIABLE, "value": " ".join(shipped.requirements)},
        ]
    network: dict[str, Any] = {}
    if settings.subnet_id:
        network["subnetId"] = settings.subnet_id
    if on_node:
        network["endpointConfiguration"] = scheduler_endpoint(settings)
    if network:
        body["networkConfiguration"] = network
    return body


def resize_body(dedicated: int, spot: int, settings: AzureSettings) -> dict[str, Any]:
    """Batch's "resize pool" body; Batch calls spot nodes low-priority."""
    return {
        "targetDedicatedNodes": dedicated,
        "targetLowPriorityNodes": spot,
        "resizeTimeout": iso_duration(settings.resize_timeout),
        "nodeDeallocationOption": "requeue",
    }


def remove_body(node_ids: list[str], deallocation: str = "requeue") -> dict[str, Any]:
    return {"nodeList": list(node_ids), "nodeDeallocationOption": deallocation}


def autoscale_formula(policy: Autoscale, slots_per_node: int) -> str:
    """A Batch autoscale formula for a long-lived pool that keeps no client attached.

    cloudmap's own autoscale follows the Dask scheduler's queue, which Batch cannot see
    (the work is not Batch tasks). This formula follows what Batch can see, the nodes'
    CPU: grow by ``step`` while the pool is busy, shrink by ``step`` when it idles, within
    ``min_nodes`` and ``max_nodes``; spot nodes above ``min_nodes`` when ``policy.spot``.
    """
    del slots_per_node  # Batch measures CPU per node, whatever the slots
    step = policy.step
    lines = [
        "$busy = avg($CPUPercent.GetSample(TimeInterval_Minute * 5, 50));",
        "$now = $TargetDedicatedNodes + $TargetLowPriorityNodes;",
        f"$wanted = $busy > 70 ? $now + {step} : ($busy < 20 ? $now - {step} : $now);",
        f"$total = min({policy.max_nodes}, max({policy.min_nodes}, $wanted));",
    ]
    if policy.spot:
        lines += [
            f"$TargetDedicatedNodes = {policy.min_nodes};",
            f"$TargetLowPriorityNodes = max(0, $total - {policy.min_nodes});",
        ]
    else:
        lines += ["$TargetDedicatedNodes = $total;", "$TargetLowPriorityNodes = 0;"]
    lines.append("$NodeDeallocationOption = taskcompletion;")
    return "\n".join(lines)


def iso_duration(seconds: float) -> str:
    """Batch's ISO 8601 durations: ``PT15M``, ``PT90S``."""
    whole = max(1, math.ceil(seconds))
    minutes, secs = divmod(whole, 60)
    return f"PT{minutes}M{secs}S" if secs else f"PT{minutes}M"


def redacted(body: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to print: secret environment settings replaced by a note."""
    copy = json.loads(json.dumps(body))
    for setting in copy.get("startTask", {}).get("environmentSettings", []):
        if setting.get("name") in SECRET_VARIABLES:
            setting["value"] = "<secret: node configuration, certificates and credentials>"
    return copy
