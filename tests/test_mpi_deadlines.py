"""The deadlines of a run across hosts, with MPICH's real ``mpiexec`` and proxies: hydra
waits forever for a proxy that never connects, and ignores SIGTERM meanwhile, so cloudmap
must end both sides itself (decision 0007)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from cloudmap.node import mpi_launch, mpi_proxy
from cloudmap.node.mpi_spec import MpiSpec, RunNode

pytest.importorskip("mpi4py", reason="install the cloudmap[mpi] extra")

T = TypeVar("T")


def _spec(run_id: str) -> MpiSpec:
    nodes = (RunNode("node-a", "127.0.0.1", "tcp://x:1"), RunNode("node-b", "127.0.0.1", ""))
    return MpiSpec(run_id=run_id, nodes=nodes, ranks_per_node=1, command="sleep 30")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Await ``coroutine`` on an event loop of its own, in a thread of its own: on a slot
    these run on the worker's loop, and a test earlier in the session may leave a loop
    running in the main thread, where ``asyncio.run`` refuses to start another."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_mpiexec_whose_proxies_never_connect_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mpi_launch, "PROXY_CONNECT_TIMEOUT", 0.5)
    monkeypatch.setattr(mpi_launch, "GUARD_MARGIN", 0.0)
    directories = [str(tmp_path / "a"), str(tmp_path / "b")]
    for directory in directories:
        Path(directory).mkdir()

    async def scenario() -> tuple[dict[str, object], int, float]:
        spec = _spec("never")
        started = await mpi_launch.start_launcher(spec, directories)
        pid = mpi_launch._running[spec.run_id].process.pid
        began = time.monotonic()
        outcome = await mpi_launch.watch_launcher(spec, directories)
        return {**started, **outcome}, pid, time.monotonic() - began

    outcome, pid, took = run(scenario())
    assert len(outcome["lines"]) == 2  # type: ignore[arg-type]
    assert outcome["exit_code"] == -9 and not outcome["timed_out"]
    assert took < 5, "mpiexec outlived its proxies' deadline"
    assert not _alive(pid)


def test_a_proxy_that_cannot_reach_mpiexec_gives_up_and_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mpi_proxy, "PROXY_CONNECT_TIMEOUT", 1.0)
    spec = _spec("unreachable")
    # Hydra's proxy line for a port where nothing listens: it retries for ~10 s.
    line = (
        f"{mpi_launch.mpiexec_path().parent / 'hydra_pmi_proxy'} --control-port "
        "127.0.0.1:9 --rmk user --launcher manual --demux poll --pgid 0 --retries 10 "
        "--usize -1 --pmi-port 0 --proxy-id 1"
    )
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # other tests' too
    began = time.monotonic()
    problem = run(mpi_proxy.start_proxy(spec, 1, line, str(tmp_path)))
    assert problem is not None and "could not join mpiexec at 127.0.0.1:9" in problem
    assert "mpi=True" in problem
    assert time.monotonic() - began < 8
    assert not mpi_proxy._proxies
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in started if _alive(p.pid)]


def test_a_line_that_is_not_a_proxy_is_refused(tmp_path: Path) -> None:
    problem = run(mpi_proxy.start_proxy(_spec("odd"), 0, "rm -rf /", str(tmp_path)))
    assert problem is not None and "does not understand" in problem
