"""``cloudmap.map`` / ``imap`` / ``submit`` / ``current_pool()`` on real local pools: the
innermost ``with pool:`` block's pool, the rule across threads, bad input, and the default
pool (in a subprocess, so that its closing at exit is seen and nothing is left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest

import cloudmap
from cloudmap.testing.processes import node_processes


def slot_pid(_: object = None) -> int:
    return os.getpid()


def test_map_submit_and_imap_use_the_innermost_pool() -> None:
    with cloudmap.Pool(nodes=1) as outer:
        outer_pid = outer.submit(slot_pid).result(timeout=60)
        assert cloudmap.current_pool() is outer
        assert cloudmap.map(slot_pid, range(3), progress=False) == [outer_pid] * 3
        with cloudmap.Pool(nodes=1) as inner:
            inner_pid = inner.submit(slot_pid).result(timeout=60)
            assert inner_pid != outer_pid
            assert cloudmap.current_pool() is inner
            assert cloudmap.map(slot_pid, range(3), progress=False) == [inner_pid] * 3
            assert cloudmap.submit(slot_pid).result(timeout=60) == inner_pid
            found = list(cloudmap.imap(slot_pid, range(3), ordered=False, progress=False))
            assert found == [inner_pid] * 3
            run = cloudmap.map_async(slot_pid, range(3), progress=False)
            assert run.result(timeout=60) == [inner_pid] * 3
        assert inner.closed
        assert cloudmap.current_pool() is outer  # back to the outer block's pool
        assert cloudmap.submit(slot_pid).result(timeout=60) == outer_pid
        # The pool's own options pass through: seed= gives rng=, as pool.map does.
        draws = cloudmap.map(lambda x, rng: rng.integers(100), range(3), seed=1, progress=False)
        assert draws == outer.map(lambda x, rng: rng.integers(100), range(3), seed=1)


def test_threads_see_their_own_block_else_the_latest_entered() -> None:
    """As Dask's get_client(): a thread that entered a pool uses it; a thread that entered
    none (a worker thread started inside the block) uses the one most recently entered."""
    first, second = cloudmap.Pool(nodes=0), cloudmap.Pool(nodes=0)  # no work runs here
    seen: dict[str, object] = {}
    inside = threading.Event()
    done = threading.Event()

    def enters_second() -> None:
        with second:
            seen["own"] = cloudmap.current_pool()
            inside.set()
            done.wait(30)

    with first:
        assert cloudmap.current_pool() is first
        thread = threading.Thread(target=enters_second)
        thread.start()
        assert inside.wait(30)
        assert cloudmap.current_pool() is first  # the other thread's block is not mine
        helper = threading.Thread(target=lambda: seen.setdefault("helper", cloudmap.current_pool()))
        helper.start()
        helper.join()
        done.set()
        thread.join()
        after = threading.Thread(target=lambda: seen.setdefault("after", cloudmap.current_pool()))
        after.start()
        after.join()
    assert seen == {"own": second, "helper": second, "after": first}


def test_bad_input_gives_the_pools_errors() -> None:
    started = {p.pid for p in node_processes()}
    # Refused before any pool is looked for: no default pool starts for a typo.
    with pytest.raises(cloudmap.InputError, match=r"does not take sed.*seed"):
        cloudmap.map(abs, [1], sed=1)
    with pytest.raises(cloudmap.InputError, match="not callable"):
        cloudmap.submit(3)
    assert {p.pid for p in node_processes()} == started
    with cloudmap.Pool(nodes=1) as pool:
        with pytest.raises(cloudmap.InputError, match="on_error="):
            cloudmap.map(abs, [1], on_error="explode")
        with pytest.raises(cloudmap.InputError, match="ordered"):
            cloudmap.map(abs, [1], ordered=False)  # an imap option
        with pytest.raises(cloudmap.TaskError) as caught:
            cloudmap.map(abs, ["x"], progress=False)
        assert isinstance(caught.value.exception, TypeError)
        # A task has no current pool, and does not start one on its node.
        inside = pool.submit(lambda: cloudmap.map(abs, [1])).exception(timeout=60)
        assert isinstance(inside, cloudmap.TaskError)
        assert isinstance(inside.exception, cloudmap.InputError)
        assert "inside a task on node-0" in str(inside.exception)
        pool.close()
        with pytest.raises(cloudmap.PoolClosedError):  # not a new default pool
            cloudmap.map(abs, [1])


DEFAULT_POOL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import psutil
    import cloudmap

    def pid(_=None):
        return os.getpid()

    assert cloudmap.map(abs, [-1, -2, 3], progress=False) == [1, 2, 3]
    first = cloudmap.current_pool()
    assert cloudmap.submit(pow, 2, 10).result(timeout=60) == 1024
    assert cloudmap.current_pool() is first        # made once, reused
    with cloudmap.Pool(nodes=1) as own:
        assert cloudmap.current_pool() is own      # a block wins over the default
    assert cloudmap.current_pool() is first
    first.close()
    assert list(cloudmap.imap(abs, [-4], progress=False)) == [4]
    second = cloudmap.current_pool()
    assert second is not first and not second.closed   # made again after close()
    children = [p.pid for p in psutil.Process().children(recursive=True)]
    print(json.dumps(children))
    """
)


def test_the_default_pool_is_made_once_and_closed_at_exit() -> None:
    done = subprocess.run(
        [sys.executable, "-c", DEFAULT_POOL_SCRIPT],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    children = json.loads(done.stdout.strip().splitlines()[-1])
    assert children, "the default pool started no node process"
    alive = [pid for pid in children if psutil.pid_exists(pid) and _is_running(pid)]
    assert alive == [], "the default pool's nodes outlived the interpreter"


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_star_import_does_not_shadow_the_builtin_map() -> None:
    names: dict[str, object] = {}
    exec("from cloudmap import *", names)
    assert "current_pool" in names
    assert not {"map", "imap", "submit"} & set(names)
    assert callable(cloudmap.map) and callable(cloudmap.submit) and callable(cloudmap.imap)
