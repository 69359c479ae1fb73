"""Timeouts, crashes, Ctrl-C and dead nodes on every provider (cloudmap.testing.faults)."""

from __future__ import annotations

from cloudmap.testing import FaultTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, FaultTests):
    pass


class TestAzure(AzureEmulatorHarness, FaultTests):
    pass
