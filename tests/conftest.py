"""Shared fixtures: every process a test starts is gone when the test session ends; Azure
pools whose scheduler runs in the client."""

from __future__ import annotations

from collections.abc import Iterator

import dask.config
import psutil
import pytest

from cloudmap.testing.processes import node_processes
from cloudmap.testing.waiting import eventually

__all__ = ["cloudmap_processes", "eventually"]

#: This session's pytest temporary directory, once known. Batch nodes' agents outlive the
#: start task that began them (they are not this process's descendants) but run from under
#: it. Not any "pytest-of-" directory: another test session on the machine (a second
#: checkout) has its own, and its nodes are not this session's to count or kill.
SESSION_TEMP: list[str] = []


def cloudmap_processes() -> list[psutil.Process]:
    """Node agents and slots started by this test session that are still alive."""
    return node_processes(under=SESSION_TEMP)


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    SESSION_TEMP.append(str(tmp_path_factory.getbasetemp()))
    yield
    leftovers = cloudmap_processes()
    for process in leftovers:
        process.kill()
    assert not leftovers, f"processes left running after the tests: {leftovers}"


@pytest.fixture
def scheduler_in_the_client() -> Iterator[None]:
    """Azure pools whose scheduler runs in the test's process (``scheduler="client"``): the
    emulated nodes are on this machine, the client's network, as with ``subnet_id``.
    tests/test_scheduler_on_node.py runs it on a node, the default without ``subnet_id``."""
    with dask.config.set({"cloudmap.azure.scheduler": "client"}):
        yield
