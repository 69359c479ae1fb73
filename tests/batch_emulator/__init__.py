"""A local stand-in for the Azure Batch service (REST api-version 2025-06-01), for tests.

There is no public Batch emulator, and cloudmap's Azure provider talks to Batch only through
``azure.batch.BatchClient``; so this speaks the part of the REST API that the SDK uses for
pools and compute nodes, checks Shared Key signatures the way Batch does, and runs each
node's start task as a real local process group under ``root/<pool>/<node>/``::

    with running_batch_emulator(tmp_path) as batch:
        client = batch.client()
        client.create_pool(...)
        batch.preempt(pool_id, node_id)   # admin helpers act directly, not over HTTP

Modules: ``server`` (HTTP, routing, authentication, paging), ``state`` (pools, nodes and
their state machines), ``nodes`` (node directories and processes), ``traffic`` (the request
log, and the 429 / 503 answers a test asks for).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .endpoints import Connection
from .server import API_VERSION, BatchServer
from .state import AUTOSCALE_RESIZE_CONFLICT, CORES_PER_VM_SIZE, NODE_HOST_VARIABLE, Account
from .traffic import Request

__all__ = [
    "API_VERSION",
    "AUTOSCALE_RESIZE_CONFLICT",
    "CORES_PER_VM_SIZE",
    "DEFAULT_KEY",
    "NODE_HOST_VARIABLE",
    "BatchEmulator",
    "Request",
    "running_batch_emulator",
]

#: A fixed, obviously fake account key (base64 of 32 bytes), so runs are reproducible.
DEFAULT_KEY = "Y2xvdWRtYXAtYmF0Y2gtZW11bGF0b3Itbm90LWEta2V5IQ=="


class BatchEmulator:
    """A running emulator: where to reach it, how to sign in, and admin helpers."""

    def __init__(self, server: BatchServer, account: Account, key: str) -> None:
        self._server = server
        self._account = account
        self.url = server.url
        self.account = account.name
        self.key = key

    def credential(self) -> Any:
        from azure.core.credentials import AzureNamedKeyCredential

        return AzureNamedKeyCredential(self.account, self.key)

    def client(self, **kwargs: Any) -> Any:
        """An ``azure.batch.BatchClient`` for this account (extra kwargs go to the client)."""
        from azure.batch import BatchClient

        return BatchClient(self.url, self.credential(), **kwargs)

    # Admin helpers: what Azure does on its own, triggered by the test.

    def preempt(self, pool_id: str, node_id: str) -> None:
        """Take a low-priority node away: its processes are killed (this waits until they are
        gone) and it stays listed as ``preempted``, as Batch shows evicted Spot nodes."""
        self._account.preempt(pool_id, node_id)

    def restore_preempted_after(self, seconds: float | None) -> None:
        """Bring preempted nodes back after ``seconds`` (start task again), as Batch does
        when Spot capacity returns; None keeps them preempted (the default)."""
        self._account.restore_after = seconds

    def break_node(self, pool_id: str, node_id: str) -> None:
        """A node's VM fails: it shows ``unusable`` and its processes are killed."""
        self._account.break_node(pool_id, node_id)

    def set_quota(self, **quotas: int | None) -> None:
        """Change account quotas: ``dedicated_cores``, ``low_priority_cores``, ``pools``
        (``None`` = unlimited). Applies to allocations from now on, as on Batch."""
        self._account.set_quota(**quotas)

    def fail_allocations(self, pool_id: str, seconds: float = math.inf) -> None:
        """Make the pool's allocations stall for ``seconds``: a resize adds no node until then
        and ends with ``AllocationTimedout`` once its ``resizeTimeout`` has passed."""
        self._account.fail_allocations(pool_id, seconds)

    def cut_frontend(self, pool_id: str, seconds: float) -> None:
        """The client's network drops (a laptop sleeps): every connection through the
        pool's public frontend is closed, and new ones are refused for ``seconds``."""
        self._account.cut_frontend(pool_id, seconds)

    def connections(self, pool_id: str) -> list[Connection]:
        """Every connection the pool's public frontend saw, in order (refused ones too)."""
        return self._account.connections(pool_id)

    def all_connections(self) -> list[Connection]:
        """Every connection any pool's frontend saw, deleted pools' too."""
        return self._account.all_connections()

    def public_address(self, pool_id: str) -> str:
        """The pool's public address, where its inbound NAT endpoints listen."""
        with self._account.lock:
            return self._account.pool(pool_id).public_address

    def node_processes(self, pool_id: str) -> dict[str, list[int]]:
        """Live pids per node of the pool (the start task and what it left running)."""
        return self._account.node_processes(pool_id)

    def node_dir(self, pool_id: str, node_id: str) -> Path:
        """The node's root directory ($AZ_BATCH_NODE_ROOT_DIR)."""
        return self._account.root / pool_id / node_id

    def add_fake_nodes(
        self, pool_id: str, count: int, *, state: str = "idle", dedicated: bool = True
    ) -> list[str]:
        """Put ``count`` node records in the pool, as if a resize had allocated them, and
        raise its target of that kind to match; returns their ids. They run no process and
        keep ``state`` (idle, running, creating, starting, starttaskfailed, unusable or
        preempted) until removed, so a test can list a pool of 1,000 nodes at no cost."""
        return self._account.add_fake_nodes(pool_id, count, state, dedicated)

    # Traffic: what clients asked, and Batch pushing back.

    def refuse_next(
        self, operation: str, count: int = 1, *, status: int = 429, retry_after: float | None = 1
    ) -> None:
        """Refuse the next ``count`` requests of ``operation`` (named as the SDK's method:
        ``list_nodes``, ``get_pool``, ``remove_nodes``, ...) with ``status``: 429
        ``TooManyRequests`` or 503 ``ServerBusy``, with a ``Retry-After`` header of
        ``retry_after`` seconds unless it is None. Plans for one operation queue up."""
        self._server.traffic.refuse_next(operation, count, status=status, retry_after=retry_after)

    def limit_rate(
        self, per_second: float | None, *, status: int = 503, retry_after: float | None = None
    ) -> None:
        """Under load: refuse every request beyond ``per_second`` within the last second
        (503 ``ServerBusy`` by default); None lifts the limit."""
        self._server.traffic.limit_rate(per_second, status=status, retry_after=retry_after)

    def requests(self, operation: str | None = None) -> list[Request]:
        """Every authenticated request so far (or those of one operation), in order, with
        the status it was refused with, if it was."""
        return self._server.traffic.requests(operation)

    def request_counts(self) -> Counter[str]:
        """Requests so far by operation, refused ones included."""
        return self._server.traffic.counts()

    def clear_requests(self) -> None:
        """Forget the requests so far (refusals still planned stay planned)."""
        self._server.traffic.clear()


@contextlib.contextmanager
def running_batch_emulator(
    root: Path,
    *,
    account: str = "cloudmapemu",
    key: str = DEFAULT_KEY,
    quotas: dict[str, int | None] | None = None,
    node_start_delay: float = 0.3,
    page_size: int = 2,
) -> Iterator[BatchEmulator]:
    """Serve an emulated Batch account on 127.0.0.1 (free port) from a background thread.

    ``root`` holds the nodes' directories. ``quotas`` may set ``dedicated_cores``,
    ``low_priority_cores`` and ``pools`` (unset = unlimited). ``node_start_delay`` is how
    long each node step (allocation, boot, removal) takes. ``page_size`` caps list pages below
    Batch's own 1000, small by default so that paging is exercised. On exit every node's
    process group is killed and waited for and the server stopped, whatever happened inside
    the block.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state = Account(
        name=account,
        root=root,
        base_url="",
        node_start_delay=node_start_delay,
        quotas=quotas,
        env=dict(os.environ),
    )
    server = BatchServer(state, key, page_size)
    state.base_url = server.url
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="batch-emulator-http"
    )
    thread.daemon = True
    try:
        state.start()
        thread.start()
        yield BatchEmulator(server, state, key)
    finally:
        try:
            state.shutdown()
        finally:
            if thread.is_alive():
                server.shutdown()
            server.close_connections()
            server.server_close()
            thread.join(timeout=5)


@contextlib.contextmanager
def cloudmap_uses(batch: BatchEmulator) -> Iterator[None]:
    """Make ``cloudmap.Pool("azure", ...)`` with no Azure options use this emulator: the
    account URL and the nodes' Python through Dask's configuration, the shared key through
    the environment variables the provider reads when given no credential."""
    import sys

    import dask.config

    saved = {
        name: os.environ.get(name) for name in ("AZURE_BATCH_ACCOUNT", "AZURE_BATCH_ACCESS_KEY")
    }
    os.environ["AZURE_BATCH_ACCOUNT"] = batch.account
    os.environ["AZURE_BATCH_ACCESS_KEY"] = batch.key
    try:
        with dask.config.set(
            {
                "cloudmap.azure.account_url": batch.url,
                "cloudmap.azure.python": sys.executable,  # cloudmap is importable there
                "cloudmap.azure.vm_size": "Standard_D2s_v5",
                # The emulated nodes are on this machine, the client's network, as with
                # subnet_id: the scheduler runs in the client unless a test says otherwise.
                "cloudmap.azure.scheduler": "client",
            }
        ):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
