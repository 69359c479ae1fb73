"""Pools on Azure Batch: the provider behind ``cloudmap.Pool("azure", ...)``.

The Dask scheduler runs in the client's process (docs/decisions/0005); the pool's VMs
join it over TLS with the pool's own certificates. Each node's start task starts the
cloudmap node agent (``cloudmap.node.batch_boot``), whose slots are the Dask workers.
Nodes are made, resized and removed through Batch's targets, so Batch's own view of the
pool (the portal, the CLI) always matches cloudmap's.

What the pool costs Batch does not grow with its size (docs/azure.md, "Large pools"): the
nodes are read with one paged listing per ``list_interval`` (1000 nodes a page, only the
properties cloudmap reads), never node by node; removals go 100 ids a request
(:mod:`.removals`); and a request Batch throttles or is too busy for is retried after a
backoff, while the pool goes on with what it last saw (:mod:`.throttling`).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from ... import __version__
from ...autoscale import Autoscale
from ...environment import requirements_for, shipment
from ...errors import InputError, PoolStartError
from ...loops import poll_until
from ...nodes import ProviderNode, StartTaskInfo
from ...pricing import NodePrices
from ..base import PoolSpec, Provider
from . import bodies
from .auth import default_credential
from .removals import Removals
from .scheduler_node import SchedulerNode, wait_for_scheduler_node
from .settings import FRONTEND_RANGE, AzureSettings
from .shipping import ShippedEnvironment, check_staging_url, ship
from .states import provider_state
from .throttling import Backoff, PushBack, retry_policy, transient

logger = logging.getLogger(__name__)


class _UnreadErrorBodyNoise(logging.Filter):
    """Drop the SDK's warning, with a traceback, that it could not parse the error body of
    a failed file download: the download's response is streamed and its body never read,
    so every 404 of a start task output file that does not exist (an expected case,
    handled in ``_download``) printed two tracebacks into the user's notebook. The error
    itself is still raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Ran into a deserialization error")


logging.getLogger("azure.batch._utils.model_base").addFilter(_UnreadErrorBodyNoise())

#: The Batch REST API version the SDK speaks (azure-batch 15.x).
API_VERSION = "2025-06-01"
#: The node agent's root under a Batch node's root directory (see cloudmap.node.batch_boot).
NODE_SUBDIRECTORY = "cloudmap"
#: Nodes per page of a listing: Batch's default and largest ``maxresults`` for nodes.
LIST_PAGE = 1000
#: The node properties cloudmap reads from a listing (``$select``): a page stays small.
LISTED_PROPERTIES = ["id", "state", "isDedicated", "stateTransitionTime", "startTaskInfo"]
#: Nodes whose start task output one listing fetches at most (two or four small files
#: each, once per node): the rest are fetched by the next listings, failed ones first.
OUTPUTS_PER_LISTING = 8
#: Seconds to wait for Batch to show a node whose slots died as preempted or gone.
TAKEN_WINDOW = 0.3
#: Batch states of a node whose VM was taken from the pool.
TAKEN_STATES = ("preempted", "leaving", "unusable")
#: Seconds ``close`` waits for Batch to delete the pool.
DELETE_TIMEOUT = 300.0
#: Seconds ``close`` of a kept pool waits for the removals still queued to reach Batch.
KEPT_REMOVALS_TIMEOUT = 120.0


class AzureBatchProvider(Provider):
    """Nodes as the VMs of an Azure Batch pool.

    Options: ``account_url=``, ``credential=`` (default: a shared key from
    AZURE_BATCH_ACCOUNT / AZURE_BATCH_ACCESS_KEY, else ``DefaultAzureCredential()``),
    ``vm_size=``, ``image=``, ``node_agent_sku_id=``, ``pool_id=`` (attach), ``keep_pool=``,
    ``python=``, ``install=``, ``staging_url=`` (ship this cloudmap and the client's
    versions through a blob container: cloudmap.environment), ``scheduler_host=``,
    ``scheduler_port=``, ``resize_timeout=``, ``subnet_id=``, ``mpi=``,
    ``request_timeout=``, ``list_interval=``, ``retries=``, ``backoff=``, ``backoff_max=``,
    ``prices=cloudmap.NodePrices(...)``.
    Each setting not given comes from Dask's configuration (``cloudmap.azure.*``), then
    azure.yaml.
    """

    name = "azure"
    option_names = (*AzureSettings.names(), "credential", "prices", "client")
    supports_spot = True
    tls_by_default = True
    default_nodes = 1  # one VM, not one per core of the client
    start_timeout = 900.0  # VMs take minutes to allocate and boot

    def __init__(
        self,
        spec: PoolSpec,
        *,
        credential: Any = None,
        prices: NodePrices | None = None,
        client: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(spec)
        self.settings = AzureSettings.resolve(**options)
        if prices is not None and not isinstance(prices, NodePrices):
            raise InputError(f"prices={prices!r} is not valid: pass cloudmap.NodePrices(...)")
        self._prices = prices
        if client is None and not self.settings.account_url:
            raise InputError(
                "the 'azure' provider needs account_url= (the Batch account's URL, "
                "https://<account>.<region>.batch.azure.com), or cloudmap.azure.account_url "
                "in Dask's configuration"
            )
        #: Batch's refusals (429, 503), logged once per spell.
        self.push_back = PushBack()
        self._client = (
            client
            if client is not None
            else _make_client(self.settings, credential, self.push_back)
        )
        self.pool_id = self.settings.pool_id or f"cloudmap-{uuid.uuid4().hex[:12]}"
        self._created = False
        self._closed = False
        self._lock = threading.Lock()
        self._list_lock = threading.Lock()  # one listing at a time, shared by every caller
        self._listed: tuple[float, list[ProviderNode]] = (0.0, [])
        self._list_backoff = Backoff(self.settings.backoff, self.settings.backoff_max)
        #: Every node of the last listing, hidden ones too, in cloudmap's provider states.
        self._states: dict[str, str] | None = None
        self._removals = Removals(
            self._client,
            self.pool_id,
            backoff=Backoff(self.settings.backoff, self.settings.backoff_max),
            deadline=float(self.settings.resize_timeout),
            still_listed=self._still_listed,
        )
        self._outputs: dict[str, StartTaskInfo] = {}
        self._removed: set[str] = set()  # node ids (Batch never reuses one)
        #: The client's environment as shipped to the nodes (``staging_url=``), once started.
        self.shipped: ShippedEnvironment | None = None
        self.hosts_scheduler = self.settings.scheduler_on_node
        self.reconnect_timeout = float(self.settings.reconnect_timeout)
        #: The node that hosts the scheduler (with scheduler="node"), once it does.
        self.scheduler_node: SchedulerNode | None = None
        self._scheduler_lost = False
        if self.settings.staging_url and not self.settings.install:
            check_staging_url(self.settings.staging_url, dict(spec.storage_options))

    # -- the scheduler's address, as nodes must reach it -------------------------------

    @classmethod
    def listen_address(cls, options: dict[str, Any]) -> tuple[str, int]:
        """The client's address on the network the nodes are on (decision 0005)."""
        port = int(AzureSettings.resolve_one("scheduler_port", options.get("scheduler_port")))
        host = AzureSettings.resolve_one("scheduler_host", options.get("scheduler_host"))
        if host:
            return str(host), port
        url = AzureSettings.resolve_one("account_url", options.get("account_url")) or ""
        target = urlsplit(str(url)).hostname
        if not target or target in ("127.0.0.1", "localhost"):
            return "127.0.0.1", port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 443))  # sends nothing: it picks the route's local address
            return str(probe.getsockname()[0]), port

    @classmethod
    def plan(cls, spec: PoolSpec, **options: Any) -> dict[str, Any]:
        """The requests ``Pool("azure", ...)`` would send, secrets hidden; no credentials."""
        for ignored in ("credential", "prices", "client"):
            options.pop(ignored, None)
        settings = AzureSettings.resolve(**options)
        pool_id = settings.pool_id or "cloudmap-<12 random hex digits>"
        shipped = _planned_shipment(spec, settings)
        node_spec = _node_spec(spec, shipped)
        if not settings.scheduler_on_node:
            config = bodies.node_config(node_spec, "<scheduler>", {}, pool_id)
            body = bodies.pool_body(spec, settings, pool_id=pool_id, config=config, shipped=shipped)
            requests = [_request("create_pool", "POST", "/pools", body)]
        else:
            first = bodies.scheduler_pool_body(
                spec, settings, pool_id=pool_id, tls={}, shipped=shipped
            )
            address = f"tls://<the scheduler node's private IP>:{settings.backend_port}"
            config = bodies.node_config(node_spec, address, {}, pool_id)
            slots = bodies.pool_body(
                spec, settings, pool_id=pool_id, config=config, shipped=shipped
            )
            requests = [
                _request("create_pool", "POST", "/pools", first),
                _request(
                    "replace_pool_properties",
                    "POST",
                    f"/pools/{pool_id}/updateproperties",
                    {k: slots[k] for k in ("startTask", "metadata")},
                ),
                _request(
                    "resize_pool",
                    "POST",
                    f"/pools/{pool_id}/resize",
                    bodies.resize_body(spec.nodes + 1, spec.spot_nodes, settings),
                ),
            ]
        notes = [
            "cloudmap creates no Batch jobs or tasks: work runs on the pool's Dask "
            "workers, which the start task starts",
            f"resizes: POST /pools/{pool_id}/resize; removals: POST "
            f"/pools/{pool_id}/removenodes; on close: DELETE /pools/{pool_id}"
            + (" (keep_pool: not sent)" if settings.keep_pool else ""),
        ]
        if settings.scheduler_on_node:
            notes.append(
                "scheduler on a node: the pool starts with one dedicated node, which runs the "
                "Dask scheduler on port "
                f"{settings.backend_port}, exposed on the pool's public address (ports "
                f"{settings.frontend_port}-{settings.frontend_port + FRONTEND_RANGE - 1}, "
                "one per node) to "
                f"{', '.join(settings.allow_from or ())} only, over TLS; once it listens, the "
                "start task becomes the slots' one and the pool grows to its targets "
                "(that node is in Batch's dedicated target, not in the pool's nodes)"
            )
        return {
            "provider": cls.name,
            "account_url": settings.account_url,
            "api_version": API_VERSION,
            "requests": requests,
            "notes": notes,
        }

    def planned(self) -> dict[str, Any]:
        settings = {name: getattr(self.settings, name) for name in AzureSettings.names()}
        return self.plan(self.spec, **{**settings, "pool_id": self.pool_id})

    # -- life ------------------------------------------------------------------------

    def body(self, scheduler_address: str) -> dict[str, Any]:
        """The pool body this provider sends (with secrets in it: see ``bodies.redacted``)."""
        spec = _node_spec(self.spec, self.shipped)
        config = bodies.node_config(spec, scheduler_address, self.tls, self.pool_id)
        return bodies.pool_body(
            self.spec, self.settings, pool_id=self.pool_id, config=config, shipped=self.shipped
        )

    def _ship(self) -> None:
        """With ``staging_url=`` and no ``install=``: build and upload the client's
        environment for the start task (cloudmap.environment), once per content."""
        if self.settings.install or not self.settings.staging_url:
            return
        self.shipped = ship(
            shipment(self.spec.packages),
            self.settings.staging_url,
            dict(self.spec.storage_options),
        )

    def start(self, scheduler_address: str | None) -> None:
        self._ship()
        if not self.hosts_scheduler:
            assert scheduler_address is not None
            self._create_or_attach(self.body(scheduler_address), self._targets())
            return
        # The scheduler's node first, alone; then the slots' start task, and the targets
        # (cloudmap.providers.azure.scheduler_node).
        body = bodies.scheduler_pool_body(
            self.spec, self.settings, pool_id=self.pool_id, tls=self.tls, shipped=self.shipped
        )
        self._create_or_attach(body, (0, 0))
        self.scheduler_node = wait_for_scheduler_node(
            self._client,
            self.pool_id,
            self.settings.backend_port,
            self._start_output,
            self.start_timeout,
        )
        self._replace_start_task(self.body(self.scheduler_node.internal))
        self._resize(self._targets())

    def scheduler_endpoint(self) -> str:
        """The scheduler's public address and port (Batch's inbound endpoint of its node)."""
        if self.scheduler_node is None:
            raise RuntimeError("the pool's scheduler has not started")
        return self.scheduler_node.public

    def connection_advice(self) -> str:
        allowed = ", ".join(self.settings.allow_from or ())
        return (
            f"Batch lets only allow_from=[{allowed}] reach it: is this machine's public "
            "address among them (`curl https://api.ipify.org`)? A firewall here must also "
            "let connections out to that port."
        )

    def _targets(self) -> tuple[int, int]:
        return (self.spec.nodes, self.spec.spot_nodes)

    def _start_output(self, node_id: str) -> str:
        out = self._download(node_id, "startup/stdout.txt", missing_ok=True)
        err = self._download(node_id, "startup/stderr.txt", missing_ok=True)
        return (_text(out) + _text(err)).strip()[-4000:]

    def _create_or_attach(self, body: dict[str, Any], targets: tuple[int, int]) -> None:
        from azure.batch import models

        existing = self._existing_pool() if self.settings.pool_id else None
        if existing is not None:
            self._attach(body, existing, targets)
            return
        try:
            self._client.create_pool(models.BatchPoolCreateOptions(body))
        except Exception as exc:
            raise PoolStartError(
                f"Batch refused to create pool {self.pool_id!r}: {describe_error(exc)}", []
            ) from exc
        self._created = True

    def _replace_start_task(self, body: dict[str, Any]) -> None:
        """Give the pool another start task: Batch runs it on the nodes that join from now."""
        from azure.batch import models

        self._client.replace_pool_properties(
            self.pool_id,
            models.BatchPoolReplaceOptions(
                {
                    "startTask": body["startTask"],
                    "applicationPackageReferences": [],
                    "metadata": body["metadata"],
                }
            ),
        )

    def _existing_pool(self) -> Any:
        """The pool named ``pool_id`` as Batch has it, or None when there is none."""
        try:
            return self._client.get_pool(self.pool_id)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise

    def _attach(self, body: dict[str, Any], pool: Any, targets: tuple[int, int]) -> None:
        """Take over a pool cloudmap made earlier (kept with ``keep_pool``): give it this
        client's start task (scheduler address, certificates), then replace its nodes,
        whose agents still serve the old client, with fresh ones at this pool's targets.
        An attached pool is kept when this client closes, as it was found."""
        tags = {item.name: item.value for item in (pool.metadata or [])}
        if bodies.TAG not in tags:
            raise InputError(
                f"pool {self.pool_id!r} exists but was not made by cloudmap (no "
                f"{bodies.TAG!r} metadata); pass another pool_id, or none to create one"
            )
        self._replace_start_task(body)
        self._created = True
        self.settings = dataclasses.replace(self.settings, keep_pool=True)
        old = [
            node.id
            for node in self._client.list_nodes(self.pool_id, max_results=LIST_PAGE, select=["id"])
        ]
        self._removals.remove(old)
        self._removals.wait(self.settings.resize_timeout)
        self._resize(targets)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._created:
            self._removals.stop()
            return
        for node in self._list(fresh=True):
            self.events.lost(node.id)
        if self.settings.keep_pool:
            # The pool stays: the removals asked for must still reach Batch.
            if not self._removals.wait(KEPT_REMOVALS_TIMEOUT):
                logger.warning(
                    "cloudmap: Batch had not removed every node cloudmap removed from pool "
                    "%s within %.0f s; look for them with `az batch node list --pool-id %s` "
                    "and delete them, or they go on costing",
                    self.pool_id,
                    KEPT_REMOVALS_TIMEOUT,
                    self.pool_id,
                )
            self._removals.stop()
            logger.warning(
                "cloudmap: leaving Azure Batch pool %s running (keep_pool)", self.pool_id
            )
            return
        self._removals.stop()  # deleting the pool removes every node
        try:
            self._client.begin_delete_pool(self.pool_id, polling_interval=1).result(
                timeout=DELETE_TIMEOUT
            )
        except Exception as exc:
            if _status(exc) != 404:
                logger.error(
                    "cloudmap: could not delete Azure Batch pool %s (%s); delete it with "
                    "`python -m cloudmap pools delete %s`",
                    self.pool_id,
                    describe_error(exc),
                    self.pool_id,
                )

    # -- size ------------------------------------------------------------------------

    def add_nodes(self, count: int, *, dedicated: bool = True) -> list[str]:
        """Raise Batch's target by ``count`` above the nodes of that kind it holds."""
        present = [n for n in self._list() if n.dedicated == dedicated and n.state != "leaving"]
        self.grow_to(len(present) + count, dedicated=dedicated, present=len(present))
        return []  # Batch names nodes as it allocates them

    def grow_to(self, target: int, *, dedicated: bool, present: int) -> None:
        """Raise Batch's target for that kind to ``target`` (removals lower it).

        Idempotent, unlike adding a count: asked again before Batch has listed the new
        nodes, it asks for the same target. Batch's own targets are read first, so nothing
        here can drift from them; while Batch is resizing it refuses (409) and the pool's
        scaling loop asks again a second later.
        """
        pool = self._client.get_pool(self.pool_id)
        current = (
            (pool.target_dedicated_nodes or 0) - self._scheduler_nodes(),
            pool.target_low_priority_nodes or 0,
        )
        wanted = (
            (max(current[0], target), current[1])
            if dedicated
            else (current[0], max(current[1], target))
        )
        if wanted != current:
            self._resize(wanted)

    def remove_nodes(self, node_ids: Sequence[str]) -> None:
        """Remove nodes, :data:`~.removals.MAX_REMOVALS` ids a request, one request after
        the other (:mod:`.removals`): the first now, the rest in the background."""
        ids = list(node_ids)
        if not ids:
            return
        for node_id in ids:
            self.events.lost(node_id)
        self._removed.update(ids)
        with self._list_lock:  # the next listing is fresh; until then they are gone
            _, nodes = self._listed
            self._listed = (0.0, [n for n in nodes if n.id not in self._removed])
        self._removals.remove(ids)

    def _scheduler_nodes(self) -> int:
        """Nodes Batch's dedicated target holds beyond the pool's: the scheduler's."""
        return 1 if self.hosts_scheduler else 0

    def _resize(self, targets: tuple[int, int]) -> None:
        """Set Batch's targets to the pool's ``targets`` (dedicated, spot)."""
        from azure.batch import models

        dedicated, spot = targets
        body = bodies.resize_body(dedicated + self._scheduler_nodes(), spot, self.settings)
        try:
            self._client.begin_resize_pool(self.pool_id, models.BatchPoolResizeOptions(body))
        except Exception as exc:
            if _status(exc) != 409:  # 409: resizing already, or Batch autoscale in charge
                raise

    # -- reading ---------------------------------------------------------------------

    def list_nodes(self) -> list[ProviderNode]:
        return self._list()

    def _list(self, fresh: bool = False) -> list[ProviderNode]:
        """The pool's nodes: one paged listing per ``list_interval`` at most, shared by
        every caller; while Batch pushes back, what it last said (see :mod:`.throttling`).
        A caller that finds another's listing under way (which may be waiting out a
        Retry-After) gets the last one rather than wait, unless there is none yet."""
        taken, nodes = self._listed
        if not fresh and time.monotonic() - taken < self.settings.list_interval:
            return nodes
        if not self._list_lock.acquire(blocking=fresh or self._states is None):
            return nodes
        try:
            taken, nodes = self._listed
            if not fresh and time.monotonic() - taken < self.settings.list_interval:
                return nodes
            if self._closed or not self._created:
                return []
            if not self._list_backoff.ready():
                return nodes
            try:
                listed = list(
                    self._client.list_nodes(
                        self.pool_id, max_results=LIST_PAGE, select=LISTED_PROPERTIES
                    )
                )
            except Exception as exc:
                if not transient(exc):
                    raise
                self.push_back.refused(describe_error(exc))
                wait = self._list_backoff.failed()
                logger.debug("cloudmap: listing nodes failed (%s); next try in %.1f s", exc, wait)
                return nodes
            self._list_backoff.succeeded()
            self.push_back.answered()
            self._states = {n.id: provider_state(n.state) for n in listed}
            self._check_scheduler(listed)
            # Nodes on their way out are gone for the pool, as the local provider's are at
            # once: those cloudmap removed (Batch lists them a while longer) and any Batch
            # shows leaving the pool. Counting them would make the pool remove or replace
            # them again.
            hidden = self._removed | (
                {self.scheduler_node.node_id} if self.scheduler_node else set()
            )
            kept = [
                n for n in listed if n.id not in hidden and provider_state(n.state) != "leaving"
            ]
            self._fetch_outputs(kept)
            nodes = [self._node(n) for n in kept]
            self._listed = (time.monotonic(), nodes)  # the interval runs from the answer
            return nodes
        finally:
            self._list_lock.release()

    def _still_listed(self, node_ids: list[str]) -> list[str]:
        """Those of ``node_ids`` that Batch lists now (for a removal some of whose nodes
        were already gone)."""
        listed = self._client.list_nodes(self.pool_id, max_results=LIST_PAGE, select=["id"])
        present = {n.id for n in listed}
        return [i for i in node_ids if i in present]

    def _check_scheduler(self, listed: list[Any]) -> None:
        """A pool whose scheduler's node is gone fails at once, loudly (decision 0008)."""
        if self.scheduler_node is None or self._scheduler_lost:
            return
        reason = self.scheduler_node.lost_reason(listed)
        if reason is not None:
            self._scheduler_lost = True
            logger.error("cloudmap: %s; the pool cannot go on", reason)
            self.events.scheduler_lost(reason)

    def _wants_output(self, node: Any) -> bool:
        state = provider_state(node.state)
        return state == "start_failed" or (state == "ready" and self.spec.start_task is not None)

    def _fetch_outputs(self, listed: list[Any]) -> None:
        """Fetch the start task output of at most :data:`OUTPUTS_PER_LISTING` nodes that
        need it and lack it, failed ones first: a pool that grows by 1,000 nodes does not
        cost 2,000 downloads in one poll."""
        wanted = [n for n in listed if n.id not in self._outputs and self._wants_output(n)]
        wanted.sort(key=lambda n: provider_state(n.state) != "start_failed")
        for node in wanted[:OUTPUTS_PER_LISTING]:
            try:
                self._start_task_output(node)
            except Exception as exc:
                if not transient(exc):
                    raise
                return  # Batch pushes back: the next listing tries again

    def _node(self, node: Any) -> ProviderNode:
        state = provider_state(node.state)
        since = node.state_transition_time or datetime.now(timezone.utc)
        info = self._outputs.get(node.id) if self._wants_output(node) else None
        return ProviderNode(
            id=node.id,
            state=state,
            dedicated=bool(node.is_dedicated),
            slots=self.spec.slots_per_node,
            since=since,
            start_task=info,
            # Batch seeks its Spot target again when capacity returns.
            restoring=state == "preempted",
        )

    def _start_task_output(self, node: Any) -> StartTaskInfo:
        """The user's start task: its exit code (Batch's record of ours, which passes it
        on) and its own output, which the node agent keeps under ``cloudmap/startup``; if
        cloudmap never got that far (its install failed), Batch's start task output."""
        task = node.start_task_info
        code = getattr(task, "exit_code", None)
        own = f"{NODE_SUBDIRECTORY}/startup"
        out = self._download(node.id, f"{own}/stdout.txt", missing_ok=True)
        err = self._download(node.id, f"{own}/stderr.txt", missing_ok=True)
        if not out and not err:
            out = self._download(node.id, "startup/stdout.txt", missing_ok=True)
            err = self._download(node.id, "startup/stderr.txt", missing_ok=True)
        exit_code = code if code is not None else -1
        info = StartTaskInfo(exit_code=exit_code, stdout=_text(out), stderr=_text(err))
        self._outputs[node.id] = info
        return info

    def read_file(self, node_id: str, path: str) -> bytes:
        """A file under the node's cloudmap root (``CLOUDMAP_NODE_ROOT_DIR``), as for every
        provider: e.g. ``startup/stdout.txt``, the user's start task's output."""
        return self._download(node_id, f"{NODE_SUBDIRECTORY}/{path}")

    def _download(self, node_id: str, batch_path: str, *, missing_ok: bool = False) -> bytes:
        """A file by its path under the node's Batch root directory."""
        try:
            return b"".join(self._client.download_node_file(self.pool_id, node_id, batch_path))
        except Exception as exc:
            if missing_ok and _status(exc) == 404:
                return b""
            raise

    def node_taken(self, node_id: str) -> bool:
        """Batch marks a node preempted (or leaving, or gone) after its VM is taken: look
        for that for up to :data:`TAKEN_WINDOW` seconds before calling a lost slot a crash.
        It reads the pool's listings, not the node: slots lost on many nodes at once (a
        wave of preemptions) cost no request more than the listing."""

        def answer() -> str:
            """ "taken" or "unknown" once Batch has said, "" to look again."""
            try:
                self._list()
            except Exception:
                return "unknown"
            states = self._states
            if states is None:
                return "unknown"
            if node_id not in states:
                return "taken"  # Batch no longer lists it
            return "taken" if states[node_id] in TAKEN_STATES else ""

        return poll_until(answer, TAKEN_WINDOW, interval=0.2) == "taken"

    def allocation_errors(self) -> list[str]:
        """Why Batch could not reach the targets: its resize errors, code first."""
        try:
            pool = self._client.get_pool(self.pool_id)
        except Exception as exc:
            return [describe_error(exc)]
        return [f"{e.code}: {e.message}" for e in (pool.resize_errors or [])]

    def enable_batch_autoscale(self, policy: Autoscale, interval_minutes: int = 5) -> str:
        """Hand the pool's size to Batch's own autoscale, for a pool that outlives its
        client (``keep_pool=True``); returns the formula sent.

        Turn cloudmap's autoscale off first (``pool.autoscale(None)``): Batch refuses
        resizes while its formula is in charge. See :func:`bodies.autoscale_formula` for
        what the formula follows.
        """
        from azure.batch import models

        formula = bodies.autoscale_formula(policy, self.spec.slots_per_node)
        self._client.enable_pool_auto_scale(
            self.pool_id,
            models.BatchPoolEnableAutoScaleOptions(
                {
                    "autoScaleFormula": formula,
                    "autoScaleEvaluationInterval": f"PT{interval_minutes}M",
                }
            ),
        )
        return formula

    def describe(self) -> str:
        return f"Azure Batch pool {self.pool_id} at {self.settings.account_url}"

    def node_size(self) -> str:
        return self.settings.vm_size

    def prices(self) -> NodePrices | None:
        """The prices given, plus the scheduler's VM (a dedicated one) as an overhead."""
        if self._prices is None or not self.hosts_scheduler:
            return self._prices
        extra = self._prices.overhead + self._prices.dedicated
        return dataclasses.replace(self._prices, overhead=extra)


def _request(operation: str, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One request of a plan, its body safe to print."""
    return {"operation": operation, "method": method, "path": path, "body": bodies.redacted(body)}


def _make_client(settings: AzureSettings, credential: Any, push_back: PushBack) -> Any:
    from azure.batch import BatchClient

    if credential is None:
        credential = default_credential()
    return BatchClient(
        endpoint=str(settings.account_url),
        credential=credential,
        connection_timeout=settings.request_timeout,
        read_timeout=settings.request_timeout,
        retry_policy=retry_policy(
            retries=settings.retries,
            backoff=settings.backoff,
            backoff_max=settings.backoff_max,
            push_back=push_back,
        ),
    )


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def describe_error(exc: BaseException) -> str:
    """Batch's error code and message (never a header or a key)."""
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    message = getattr(error, "message", None) or str(exc).splitlines()[0]
    return f"{code}: {message}" if code else str(message)


def _text(data: bytes) -> str:
    return data.decode(errors="replace")[-65536:]


def _node_spec(spec: PoolSpec, shipped: ShippedEnvironment | None) -> PoolSpec:
    """The spec the node agents get: with a shipped environment, ``packages`` are in it
    (pinned) and the agent has nothing more to install."""
    return dataclasses.replace(spec, packages=()) if shipped is not None else spec


def _planned_shipment(spec: PoolSpec, settings: AzureSettings) -> ShippedEnvironment | None:
    """What ``staging_url=`` would ship, for ``plan``: the pins, and the wheel's place
    (the wheel itself is built and uploaded only when a pool starts)."""
    if settings.install or not settings.staging_url:
        return None
    check_staging_url(settings.staging_url, dict(spec.storage_options), credentials=False)
    wheel = f"cloudmap-{__version__}-py3-none-any.whl"
    url = f"{settings.staging_url.rstrip('/')}/<sha256 of the wheel>/{wheel}?<read-only SAS>"
    return ShippedEnvironment(((url, wheel),), (wheel,), requirements_for(spec.packages), ())
