"""Shared fixtures: every process a test starts is gone when the test session ends."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import psutil
import pytest

#: Where this session's nodes keep their directories; Batch nodes' agents outlive the start
#: task that began them (they are not this process's descendants) but run from under here.
SESSION_TEMP = tempfile.gettempdir()


def cloudmap_processes() -> list[psutil.Process]:
    """Node agents and slots started by this test process that are still alive."""
    found = []
    mine = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    for process in psutil.process_iter():
        try:
            line = " ".join(process.cmdline())
            ours = process.pid in mine or f"{SESSION_TEMP}/pytest-of-" in line
            if ours and "cloudmap.node" in line and process.status() != "zombie":
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind() -> Iterator[None]:
    yield
    leftovers = cloudmap_processes()
    for process in leftovers:
        process.kill()
    assert not leftovers, f"processes left running after the tests: {leftovers}"
