"""Finding and deleting the Batch pools cloudmap made: ``python -m cloudmap pools ...``.

A notebook that crashed, or a kernel killed before ``pool.close()``, leaves its Batch pool
and its VMs billing. Every pool cloudmap creates carries a ``cloudmap`` metadata item, so
they can be listed and removed from any machine with access to the account.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ...errors import InputError
from .auth import default_credential
from .bodies import TAG


@dataclass(frozen=True)
class PoolRecord:
    id: str
    state: str
    dedicated: int
    spot: int
    created_by_cloudmap: bool
    created: str
    client: str


def client_for(account_url: str | None) -> Any:
    """A BatchClient for ``account_url`` (or AZURE_BATCH_ENDPOINT), with the default
    credential (see :mod:`.auth`)."""
    from azure.batch import BatchClient

    url = account_url or os.environ.get("AZURE_BATCH_ENDPOINT")
    if not url:
        raise InputError(
            "pass --account-url https://<account>.<region>.batch.azure.com "
            "(or set AZURE_BATCH_ENDPOINT)"
        )
    return BatchClient(endpoint=url, credential=default_credential())


def list_pools(client: Any, *, everything: bool = False) -> list[PoolRecord]:
    """The account's pools that cloudmap made (all pools with ``everything``)."""
    records = []
    for pool in client.list_pools():
        tags = {item.name: item.value for item in (pool.metadata or [])}
        ours = TAG in tags
        if not (ours or everything):
            continue
        records.append(
            PoolRecord(
                id=pool.id,
                state=str(getattr(pool.state, "value", pool.state)),
                dedicated=pool.current_dedicated_nodes or 0,
                spot=pool.current_low_priority_nodes or 0,
                created_by_cloudmap=ours,
                created=tags.get("cloudmap-created", ""),
                client=tags.get("cloudmap-client", ""),
            )
        )
    return records


def delete_pools(
    client: Any, pool_ids: list[str], *, force: bool = False, wait: bool = True
) -> list[str]:
    """Delete pools by id; refuses a pool cloudmap did not make unless ``force``."""
    ours = {record.id for record in list_pools(client)}
    foreign = [pool_id for pool_id in pool_ids if pool_id not in ours]
    if foreign and not force:
        raise InputError(
            f"not deleting {', '.join(foreign)}: not made by cloudmap (no {TAG!r} metadata) "
            "or not found; pass --force to delete a pool cloudmap did not make"
        )
    pollers = [client.begin_delete_pool(pool_id, polling_interval=1) for pool_id in pool_ids]
    if wait:
        for poller in pollers:
            poller.result()
    return pool_ids
