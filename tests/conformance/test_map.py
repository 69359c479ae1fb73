"""map, imap, submit and executor on every provider (cloudmap.testing.maps)."""

from __future__ import annotations

from cloudmap.testing import MapTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, MapTests):
    pass


class TestAzure(AzureEmulatorHarness, MapTests):
    pass
