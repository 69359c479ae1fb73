"""Staged input and output files on every provider (cloudmap.testing.storage), and a bad
upload condition, refused before any pool is involved."""

from __future__ import annotations

import pytest

import cloudmap
from cloudmap.testing import StorageTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, StorageTests):
    pass


class TestAzure(AzureEmulatorHarness, StorageTests):
    pass


def test_a_bad_upload_condition() -> None:
    with pytest.raises(cloudmap.InputError, match=r"Output\(on='sometimes'\) is not one of"):
        cloudmap.Output("file:///o/{item}", on="sometimes")
