"""Storage the conformance tests stage files through: a local folder, and Azure Blob Storage
when the test session provides an account.

Blob storage is the test environment's, not the provider's: a session that has an account
(cloudmap's own tests start Azurite) defines a ``blob_connection_string`` fixture; without
one, the tests that need it are skipped and say so.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest

#: The fixture a test session defines to give the storage tests an Azure Blob account.
BLOB_FIXTURE = "blob_connection_string"


@dataclass
class Store:
    """A place in one storage backend, and how the client reaches it."""

    base: str  # URL prefix, without a trailing slash
    options: dict[str, Any]

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def write(self, name: str, text: str) -> None:
        with fsspec.open(self.url(name), "w", **self.options) as file:
            file.write(text)

    def read(self, name: str) -> str:
        with fsspec.open(self.url(name), "r", **self.options) as file:
            return str(file.read())

    def exists(self, name: str) -> bool:
        fs, path = fsspec.core.url_to_fs(self.url(name), **self.options)
        return bool(fs.exists(path))


def blob_connection_string(request: pytest.FixtureRequest) -> str:
    """The session's Azure Blob connection string; skips the test when there is none."""
    try:
        return str(request.getfixturevalue(BLOB_FIXTURE))
    except pytest.FixtureLookupError:
        pytest.skip(
            f"no Azure Blob Storage account: define a {BLOB_FIXTURE!r} fixture "
            "(a connection string; Azurite's will do)"
        )


def folder_store(directory: Path) -> Store:
    """A local folder (file://), which the nodes reach only when they run on this machine."""
    return Store(f"file://{directory}", {})


def blob_store(connection_string: str) -> Store:
    """A new, empty container of the Azure Blob account (abfs://)."""
    container = f"c{uuid.uuid4().hex[:12]}"
    options = {"connection_string": connection_string}
    fsspec.filesystem("abfs", **options).mkdir(container)
    return Store(f"abfs://{container}", options)
