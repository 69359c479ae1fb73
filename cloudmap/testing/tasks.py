"""Functions the conformance tests run on the nodes (importable there, so kept light)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def draw(x: int, rng: np.random.Generator) -> float:
    return float(rng.random() + x)


def no_rng(x: int) -> int:
    return x


def log_call(x: int, log: str) -> int:
    """Append one line per call to ``log`` (O_APPEND: safe across processes)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{x}\n".encode())
    finally:
        os.close(fd)
    return x


def fail_on(x: int, bad: frozenset[int] = frozenset({3})) -> int:
    if x in bad:
        raise ValueError(f"bad item {x}")
    return x


def fail_once(x: int, directory: str) -> int:
    """Fail the first attempt of each odd item, succeed on the next."""
    marker = Path(directory) / f"{x}.tried"
    if x % 2 and not marker.exists():
        marker.touch()
        raise RuntimeError(f"first attempt of {x}")
    return x


def hang_on(x: int, directory: str, hang: int = 3) -> int:
    """Item ``hang`` records its pid and sleeps far past any test's timeout."""
    if x == hang:
        (Path(directory) / "hung.pid").write_text(str(os.getpid()))
        time.sleep(600)
    return x


def crash_on(x: int, crash: int = 5) -> int:
    if x == crash:
        os._exit(13)
    return x


def sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def node_environment(_: object) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("CLOUDMAP_")}


def read_shared(name: str) -> str:
    return (Path(os.environ["CLOUDMAP_NODE_SHARED_DIR"]) / name).read_text().strip()


def write_shared_marker() -> None:
    """A Python start task: leaves a marker in the node's shared directory."""
    (Path(os.environ["CLOUDMAP_NODE_SHARED_DIR"]) / "python-marker").write_text("from python")
    print("start task ran")


def crash_on_odd(x: int) -> int:
    if x % 2:
        os._exit(13)
    return x


def simulate(x: int, rng: np.random.Generator, seconds: float = 0.0005) -> float:
    """A seeded Monte Carlo step that takes a little time: the chaos tests' workload."""
    deadline = time.perf_counter() + seconds
    value = float(rng.standard_normal(8).sum()) + x
    while time.perf_counter() < deadline:
        pass
    return value


def flaky(x: int, bad: frozenset[int] = frozenset({7, 4242})) -> int:
    """Raises for the items in ``bad`` and ends the slot process for item 99, every time."""
    if x == 99:
        os._exit(21)
    if x in bad:
        raise ValueError(f"item {x} is bad")
    return x


def sleep_span(x: int, seconds: float) -> tuple[float, float]:
    """Sleep; return when the call began and ended (wall clock, comparable across nodes)."""
    began = time.time()
    time.sleep(seconds)
    return began, time.time()


def shout(name: str) -> int:
    """Reads ``<name>.txt`` and the shared ``common.txt``; writes ``<name>.out`` in upper case."""
    text = Path(f"{name}.txt").read_text() + Path("common.txt").read_text()
    Path(f"{name}.out").write_text(text.upper())
    return len(text)


def fail_with_log(name: str) -> None:
    Path("log.txt").write_text(f"{name} went wrong\n")
    raise RuntimeError(f"{name} failed")


def dirty_then_clean(name: str, directory: str) -> str:
    """Fails its first attempt after leaving a file behind; a retry must not find it."""
    if Path("leftover").exists():
        raise AssertionError("the retry ran in the failed attempt's directory")
    Path("leftover").write_text("x")
    marker = Path(directory) / f"{name}.tried"
    if not marker.exists():
        marker.write_text("1")
        raise RuntimeError("first attempt fails")
    return os.getcwd()


def job_node(x: int) -> str:
    """A job's task: checks that the job's preparation ran on this node first."""
    prepared = Path(os.environ["CLOUDMAP_NODE_SHARED_DIR"], "jobs")
    assert any((job / "prepared").exists() for job in prepared.iterdir()), "not prepared"
    time.sleep(0.01)
    return os.environ["CLOUDMAP_NODE_ID"]


def read_resource(name: str) -> str:
    return (Path(os.environ["CLOUDMAP_NODE_SHARED_DIR"]) / name).read_text()


def use_package(x: int) -> str:
    import cloudmap_demo_package  # installed on the node by Pool(packages=...)

    return str(cloudmap_demo_package.greet(x))
