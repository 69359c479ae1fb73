"""Start tasks on every provider (cloudmap.testing.start_task)."""

from __future__ import annotations

from cloudmap.testing import StartTaskTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, StartTaskTests):
    pass


class TestAzure(AzureEmulatorHarness, StartTaskTests):
    pass
