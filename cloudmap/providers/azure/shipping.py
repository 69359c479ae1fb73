"""Ship the client's environment to Batch nodes through a blob container (``staging_url=``).

The wheels of :func:`cloudmap.environment.shipment` are uploaded under
``<staging_url>/<sha256 prefix>/<wheel name>``, so identical content is uploaded once, and
each becomes one of the start task's resource files: an HTTPS URL with a read-only SAS that
expires after :data:`SAS_LIFETIME`, which Batch's node agent downloads into the start
task's directory before the start task runs. The start task then installs them, and the
pinned requirements, into a virtual environment of its own (see ``bodies.BOOTSTRAP``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ...environment import Shipment
from ...errors import InputError

#: How long the nodes may download the shipped files: a pool's nodes start, and restart
#: after preemption, long after it was made.
SAS_LIFETIME = timedelta(days=30)
PROTOCOLS = ("abfs", "az")


@dataclass(frozen=True)
class ShippedEnvironment:
    """What the start task gets: resource files (httpUrl, filePath), and what to install."""

    resource_files: tuple[tuple[str, str], ...]
    wheels: tuple[str, ...]
    requirements: tuple[str, ...]
    uploaded: tuple[str, ...]  # blob paths written this time (the others were there)


def check_staging_url(
    staging_url: str, storage_options: dict[str, Any], *, credentials: bool = True
) -> None:
    """Refuse a staging URL the nodes cannot be given access to, saying what works
    (``credentials=False``: the URL alone, for a plan made without credentials)."""
    protocol = staging_url.split("://", 1)[0] if "://" in staging_url else ""
    if protocol not in PROTOCOLS:
        raise InputError(
            f"staging_url={staging_url!r} is not valid: pass an Azure Blob container the "
            "nodes can read, abfs://<container>/<folder>, with storage_options= holding "
            "connection_string= (or account_name= and account_key=)"
        )
    if credentials and not (
        storage_options.get("connection_string")
        or (storage_options.get("account_name") and storage_options.get("account_key"))
    ):
        raise InputError(
            "staging_url needs a storage account key, to give the nodes read access to the "
            "shipped files: pass storage_options={'connection_string': ...} (or "
            "account_name= and account_key=)"
        )


def ship(
    shipment: Shipment, staging_url: str, storage_options: dict[str, Any]
) -> ShippedEnvironment:
    """Upload what is not there yet; return the nodes' resource files and install list."""
    import fsspec

    check_staging_url(staging_url, storage_options)
    fs, root = fsspec.core.url_to_fs(staging_url, **storage_options)
    root = root.strip("/")
    container = root.split("/", 1)[0]
    if not fs.exists(container):
        fs.mkdir(container)
    files, uploaded = [], []
    for wheel in shipment.wheels:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]
        path = f"{root}/{digest}/{wheel.name}"
        if not fs.exists(path):
            fs.put_file(str(wheel), path)
            uploaded.append(path)
        files.append((_read_url(path, storage_options), wheel.name))
    return ShippedEnvironment(
        tuple(files),
        tuple(wheel.name for wheel in shipment.wheels),
        shipment.requirements,
        tuple(uploaded),
    )


def _read_url(path: str, storage_options: dict[str, Any]) -> str:
    """An HTTPS URL of the blob at ``container/name`` with a read-only SAS."""
    from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

    container, _, name = path.partition("/")
    if storage_options.get("connection_string"):
        service = BlobServiceClient.from_connection_string(storage_options["connection_string"])
    else:
        account = storage_options["account_name"]
        service = BlobServiceClient(
            f"https://{account}.blob.core.windows.net",
            credential={"account_name": account, "account_key": storage_options["account_key"]},
        )
    credential = service.credential
    sas = generate_blob_sas(
        account_name=credential.account_name,
        container_name=container,
        blob_name=name,
        account_key=credential.account_key,
        permission=BlobSasPermissions(read=True),
        expiry=datetime.now(timezone.utc) + SAS_LIFETIME,
    )
    return f"{service.get_blob_client(container, name).url}?{sas}"
