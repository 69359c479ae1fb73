"""Shared fixtures: every process a test starts is gone when the test session ends."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest


def cloudmap_processes() -> list[psutil.Process]:
    """Node agents and slots started by this test process that are still alive."""
    found = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "cloudmap.node" in " ".join(child.cmdline()) and child.status() != "zombie":
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind() -> Iterator[None]:
    yield
    leftovers = cloudmap_processes()
    for process in leftovers:
        process.kill()
    assert not leftovers, f"processes left running after the tests: {leftovers}"
