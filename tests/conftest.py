"""Shared fixtures: every process a test starts is gone when the test session ends."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import psutil
import pytest

from cloudmap.loops import poll_until

#: This session's pytest temporary directory, once known. Batch nodes' agents outlive the
#: start task that began them (they are not this process's descendants) but run from under
#: it. Not any "pytest-of-" directory: another test session on the machine (a second
#: checkout) has its own, and its nodes are not this session's to count or kill.
SESSION_TEMP: list[str] = []


def cloudmap_processes() -> list[psutil.Process]:
    """Node agents and slots started by this test session that are still alive."""
    found = []
    mine = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    for process in psutil.process_iter():
        try:
            line = " ".join(process.cmdline())
            ours = process.pid in mine or any(f"{temp}/" in line for temp in SESSION_TEMP)
            if ours and "cloudmap.node" in line and process.status() != "zombie":
                found.append(process)
        except psutil.Error:
            continue
    return found


def eventually(check: Callable[[], object], seconds: float) -> bool:
    """Whether ``check()`` becomes true within ``seconds`` (polled every 50 ms)."""
    return bool(poll_until(check, seconds, interval=0.05))


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    SESSION_TEMP.append(str(tmp_path_factory.getbasetemp()))
    yield
    leftovers = cloudmap_processes()
    for process in leftovers:
        process.kill()
    assert not leftovers, f"processes left running after the tests: {leftovers}"
