"""Spot nodes, preemption, resizing and autoscale on every provider (cloudmap.testing.elastic)."""

from __future__ import annotations

from cloudmap.testing import ElasticTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, ElasticTests):
    pass


class TestAzure(AzureEmulatorHarness, ElasticTests):
    pass
