"""MPI multi-instance runs on every provider (cloudmap.testing.mpi)."""

from __future__ import annotations

from cloudmap.testing import MpiTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, MpiTests):
    pass


class TestAzure(AzureEmulatorHarness, MpiTests):
    pass
