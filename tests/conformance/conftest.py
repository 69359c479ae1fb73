"""The conformance suite's environment: an Azure Blob account (Azurite) for the storage tests.

Which providers run the suite is said by the test modules, one class per provider harness
(harnesses.py) and conformance area (cloudmap.testing).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..azurite import running_azurite


@pytest.fixture(scope="module")
def blob_connection_string() -> Iterator[str]:
    """Azurite's connection string, shared by the tests of one module."""
    with running_azurite() as connection_string:
        yield connection_string
