"""Jobs with preparation and release on every provider (cloudmap.testing.jobs)."""

from __future__ import annotations

from cloudmap.testing import JobTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, JobTests):
    pass


class TestAzure(AzureEmulatorHarness, JobTests):
    pass
