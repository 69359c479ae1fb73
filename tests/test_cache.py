"""cache=: a re-run computes nothing, a change of function or seed misses, a resumed run is
bit-identical to a fresh one on another pool size, a client killed half-way resumes where it
stopped, and bad input is refused before any work. Real local pools, real Dask, fsspec's
local filesystem and (for abfs://) Azurite."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import psutil
import pytest

import cloudmap
from cloudmap import InputError, TaskError
from cloudmap.cache import CachedMapEngine, CacheWriteWarning, ResultCache
from cloudmap.engine import MapEngine
from cloudmap.options import MapOptions
from cloudmap.seeding import item_rng
from cloudmap.testing.waiting import eventually

from .azurite import running_azurite
from .test_engine import FakeCluster, Finish, numbered

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the nodes do not import tests/

#: The function a killed client and the test both run: in a module of its own (written to
#: the test's folder), so that the two processes hash the same code.
WORK_MODULE = """
import time


def draw(x, rng, log, seconds=0.0):
    time.sleep(seconds)
    with open(log, "a") as handle:
        handle.write(f"{x}\\n")
    return rng.random(3)
"""


def calls(log: Path) -> list[int]:
    """The items the nodes called the function on, in the order the calls ended."""
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def nodes_under(root: Path) -> list[psutil.Process]:
    """The live node agents and slots of the pool whose root is ``root``, whoever started
    them (a killed client's nodes are nobody's children)."""
    found = []
    for process in psutil.process_iter():
        try:
            line = " ".join(process.cmdline())
            if "cloudmap.node" in line and f"{root}/" in line and process.status() != "zombie":
                found.append(process)
        except psutil.Error:
            continue
    return found


def logged_draw(x: int, rng: np.random.Generator, log: str) -> np.ndarray:
    with open(log, "a") as handle:
        handle.write(f"{x}\n")
    return rng.random(3)


def logged_square(x: int, log: str) -> int:
    with open(log, "a") as handle:
        handle.write(f"{x}\n")
    if x == 3:
        raise ValueError("three is refused")
    return x * x


def expected(seed: int, n: int) -> bytes:
    """What a fresh run of ``draw`` returns, computed here, as bytes (bit-identity)."""
    return np.stack([item_rng(seed, i).random(3) for i in range(n)]).tobytes()


def as_bytes(results: list[Any]) -> bytes:
    return np.stack(results).tobytes()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cloudmap.Pool]:
    root = tmp_path_factory.mktemp("cache-pool")
    with cloudmap.Pool(nodes=2, slots_per_node=1, root=str(root)) as pool:
        yield pool


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "calls.log"


def test_a_rerun_computes_nothing(pool: cloudmap.Pool, tmp_path: Path, log: Path) -> None:
    fn = functools.partial(logged_draw, log=str(log))
    cache = str(tmp_path / "cache")
    first = pool.map(fn, range(40), seed=3, cache=cache, progress=False)
    assert sorted(calls(log)) == list(range(40))
    again = pool.map(fn, range(40), seed=3, cache=cache, progress=False)
    ordered = list(pool.imap(fn, range(40), seed=3, cache=cache, progress=False))
    unordered = pool.imap(fn, range(40), seed=3, cache=cache, ordered=False, progress=False)
    in_background = pool.map_async(fn, range(40), seed=3, cache=cache, progress=False)
    assert as_bytes(in_background.result(timeout=60)) == expected(3, 40)
    assert len(calls(log)) == 40  # no call at all
    assert as_bytes(again) == as_bytes(first) == as_bytes(ordered) == expected(3, 40)
    assert sorted(map(np.ndarray.tobytes, unordered)) == sorted(map(np.ndarray.tobytes, first))


def test_a_changed_function_or_seed_misses(pool: cloudmap.Pool, tmp_path: Path, log: Path) -> None:
    cache = str(tmp_path / "cache")
    offset = 1

    def shifted(x: int) -> int:
        with open(log, "a") as handle:
            handle.write(f"{x}\n")
        return x + offset

    def run(fn: Callable[..., Any], **options: Any) -> list[Any]:
        return pool.map(fn, range(10), cache=cache, progress=False, **options)

    assert run(shifted) == list(range(1, 11))
    assert run(shifted) == list(range(1, 11)) and len(calls(log)) == 10
    offset = 2  # a closure value: what the function computes changed
    assert run(shifted) == list(range(2, 12)) and len(calls(log)) == 20
    seeded = functools.partial(logged_draw, log=str(log))
    assert as_bytes(run(seeded, seed=1)) == expected(1, 10) and len(calls(log)) == 30
    assert as_bytes(run(seeded, seed=2)) == expected(2, 10) and len(calls(log)) == 40
    assert as_bytes(run(seeded, seed=1)) == expected(1, 10) and len(calls(log)) == 40


def test_a_resumed_run_is_bit_identical_on_another_pool_size(
    pool: cloudmap.Pool, tmp_path: Path, log: Path
) -> None:
    fn = functools.partial(logged_draw, log=str(log))
    cache = str(tmp_path / "cache")
    items = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3
    with cloudmap.Pool(nodes=1, slots_per_node=1, root=str(tmp_path / "small")) as small:
        part = small.map(fn, items[:25], seed=9, cache=cache, batch_size=4, progress=False)
    assert len(calls(log)) == 25
    whole = pool.map(fn, items, seed=9, cache=cache, batch_size=7, progress=False)
    assert len(calls(log)) == 60  # only the 35 missing items ran
    fresh = pool.map(fn, items, seed=9, progress=False)
    assert as_bytes(whole) == as_bytes(fresh) == expected(9, 60)
    assert as_bytes(whole[:25]) == as_bytes(part)


def test_failed_items_are_not_cached(pool: cloudmap.Pool, tmp_path: Path, log: Path) -> None:
    fn = functools.partial(logged_square, log=str(log))
    cache = str(tmp_path / "cache")
    with pytest.raises(TaskError) as info:
        pool.map(fn, range(6), cache=cache, progress=False)
    finished = set(info.value.results)  # stored although the map raised
    assert 3 not in finished
    ran = len(calls(log))
    first = pool.map(fn, range(6), cache=cache, on_error="return", progress=False)
    assert isinstance(first[3], TaskError) and first[3].index == 3
    assert sorted(calls(log)[ran:]) == sorted(set(range(6)) - finished)
    skipped = pool.map(fn, range(6), cache=cache, on_error="skip", progress=False)
    assert skipped == [0, 1, 4, 16, 25]
    with pytest.raises(TaskError) as again:
        pool.map(fn, range(6), cache=cache, progress=False)
    assert again.value.index == 3
    assert again.value.results == {0: 0, 1: 1, 2: 4, 4: 16, 5: 25}  # the cached ones too
    assert calls(log)[-2:] == [3, 3]  # only the failing item ran again, each time
    assert len(calls(log)) == ran + len(set(range(6)) - finished) + 2


def test_a_part_cut_short_is_skipped(tmp_path: Path) -> None:
    options = MapOptions(cache=str(tmp_path / "cache"))
    cache = ResultCache.for_map(abs, 1, options)
    assert cache is not None
    for index in range(3):
        cache.add(ResultCache.key(index, index), index * 10)
    cache.flush()
    cache.add(ResultCache.key(3, 3), 30)
    cache.flush()
    parts = sorted(Path(cache.folder).glob("*.part"))
    assert len(parts) == 2
    parts[1].write_bytes(parts[1].read_bytes()[:-5])  # a kill in the middle of a write
    (Path(cache.folder) / "junk.part").write_bytes(b"not a part")
    stored = cache.load()
    assert sorted(stored.values()) == [0, 10, 20]


def add_logged(x: int, y: int, log: str) -> int:
    with open(log, "a") as handle:
        handle.write(f"{x}\n")
    return x + y


def test_several_iterables_and_an_empty_input(
    pool: cloudmap.Pool, tmp_path: Path, log: Path
) -> None:
    fn = functools.partial(add_logged, log=str(log))
    cache = str(tmp_path / "cache")
    assert pool.map(fn, [1, 2, 3], [10, 20, 30], cache=cache, progress=False) == [11, 22, 33]
    assert pool.map(fn, [1, 2, 3], [10, 20, 30], cache=cache, progress=False) == [11, 22, 33]
    assert pool.map(fn, [1, 2, 3], [10, 20, 40], cache=cache, progress=False) == [11, 22, 43]
    assert sorted(calls(log)) == [1, 2, 3, 3]
    assert pool.map(fn, [], [], cache=cache, progress=False) == []


def test_many_parts_are_merged_when_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cloudmap.cache.COMPACT_PARTS", 3)
    cache = ResultCache.for_map(abs, 1, MapOptions(cache=str(tmp_path / "cache")))
    assert cache is not None
    for index in range(5):
        cache.add(ResultCache.key(index, index), index)
        cache.flush()
    assert len(list(Path(cache.folder).glob("*.part"))) == 5
    assert sorted(cache.load().values()) == [0, 1, 2, 3, 4]
    assert len(list(Path(cache.folder).glob("*.part"))) == 1
    assert sorted(cache.load().values()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("cache", "match"),
    [
        (5, "cache=5 is not valid"),
        ("nosuchprotocol://bucket/cache", "cannot be opened"),
    ],
)
def test_an_unusable_cache_option_is_refused(
    pool: cloudmap.Pool, log: Path, cache: Any, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        pool.map(functools.partial(logged_square, log=str(log)), range(3), cache=cache)
    assert not log.exists()


def test_a_cache_that_cannot_be_written_is_refused_before_any_work(
    pool: cloudmap.Pool, tmp_path: Path, log: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match=f"cache='{blocker}/cache' cannot be written"):
        pool.map(functools.partial(logged_square, log=str(log)), range(3), cache=f"{blocker}/cache")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as root: a read-only folder can still be written")
        with pytest.raises(InputError, match="cannot be written"):
            pool.map(functools.partial(logged_square, log=str(log)), range(3), cache=read_only)
    finally:
        read_only.chmod(0o700)
    assert not log.exists()


def test_a_function_without_a_reproducible_hash_is_refused_before_any_work(
    pool: cloudmap.Pool, tmp_path: Path, log: Path
) -> None:
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return logged_square(x, str(log))

    with pytest.raises(InputError) as info:
        pool.map(locked, range(3), cache=str(tmp_path / "cache"))
    message = str(info.value)
    assert "locked" in message and "closure variable 'lock'" in message
    assert "functools.partial" in message and "late-bound" in message
    assert not log.exists() and not list((tmp_path / "cache").glob("*/*.part"))


def test_staged_files_and_endless_input_are_refused(
    pool: cloudmap.Pool, tmp_path: Path, log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = functools.partial(logged_square, log=str(log))
    cache = str(tmp_path / "cache")
    with pytest.raises(InputError, match="does not go with inputs= or outputs="):
        pool.map(fn, range(3), cache=cache, inputs=str(tmp_path / "{item}.txt"))
    with pytest.raises(InputError, match=r"pool\.run does not take cache="):
        pool._work.map_all(fn, (range(3),), MapOptions(cache=cache), staged=True)
    monkeypatch.setattr("cloudmap.cache.MAX_ITEMS", 100)

    def endless() -> Iterator[int]:
        x = 0
        while True:
            yield x
            x += 1

    with pytest.raises(InputError, match="an endless generator"):
        pool.imap(fn, endless(), cache=cache)
    with pytest.raises(InputError, match="submit does not"):
        pool.executor(cache=cache).submit(fn, 3)
    with pool.executor(cache=cache) as executor:  # its map caches, as pool.map does
        assert list(executor.map(fn, range(3))) == [0, 1, 4]
    log.unlink()
    assert pool.map(fn, range(3), cache=cache) == [0, 1, 4]
    assert not log.exists()  # computed by executor.map, taken from the cache


@pytest.mark.filterwarnings("ignore:Failed to fetch container properties")
def test_a_blob_storage_cache(pool: cloudmap.Pool, log: Path) -> None:
    fn = functools.partial(logged_draw, log=str(log))
    with running_azurite() as connection_string:
        options = {"connection_string": connection_string}
        url = "abfs://results/cache"
        first = pool.map(fn, range(20), seed=4, cache=url, storage_options=options)
        again = pool.map(fn, range(20), seed=4, cache=url, storage_options=options)
        assert len(calls(log)) == 20
        assert as_bytes(first) == as_bytes(again) == expected(4, 20)
        wrong = {"connection_string": connection_string.replace("AccountKey=", "AccountKey=A")}
        with pytest.raises(InputError, match="cache='abfs://results/cache' cannot be"):
            pool.map(fn, range(20), seed=4, cache=url, storage_options=wrong)
    assert len(calls(log)) == 20


def test_a_client_killed_half_way_resumes_with_only_the_missing_items(
    pool: cloudmap.Pool, tmp_path: Path, log: Path
) -> None:
    (tmp_path / "cachework.py").write_text(WORK_MODULE)
    cache = tmp_path / "cache"
    root = tmp_path / "killed-pool"
    n = 120
    client = textwrap.dedent(
        f"""
        import functools, sys
        import cloudpickle
        sys.path.insert(0, {str(tmp_path)!r})
        import cachework
        import cloudmap
        cloudpickle.register_pickle_by_value(cachework)
        fn = functools.partial(cachework.draw, log={str(log)!r}, seconds=0.05)
        with cloudmap.Pool(nodes=1, slots_per_node=2, root={str(root)!r}) as pool:
            pool.map(fn, range({n}), seed=5, cache={str(cache)!r}, batch_size=2, progress=False)
        print("finished")
        """
    )
    process = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE)
    try:
        assert eventually(lambda: len(list(cache.glob("*/*.part"))) >= 2, 60), "no results"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        # The killed client's nodes go too (they lose their scheduler); none is left running.
        assert eventually(lambda: not nodes_under(root), 30), nodes_under(root)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for leftover in nodes_under(root):
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
    assert process.stdout is not None and b"finished" not in process.stdout.read()
    before = len(calls(log))
    sys.path.insert(0, str(tmp_path))
    try:
        import cachework  # type: ignore[import-not-found]

        cloudpickle.register_pickle_by_value(cachework)
        fn = functools.partial(cachework.draw, log=str(log), seconds=0.05)
        options = MapOptions(seed=5, cache=str(cache))
        stored = ResultCache.for_map(fn, 1, options)
        assert stored is not None
        keys = stored.load()
        cached = {i for i in range(n) if ResultCache.key(i, i) in keys}
        assert len(cached) == len(keys)
        assert 0 < len(cached) < n, "the kill came too late or too early"
        results = pool.map(fn, range(n), seed=5, cache=str(cache), progress=False)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cachework", None)
    resumed = calls(log)[before:]
    assert sorted(resumed) == sorted(set(range(n)) - cached)  # each missing item once
    assert as_bytes(results) == expected(5, n)


# -- the engine's part, on test_engine's scripted fake cluster (pure logic, no processes) ----


def fake_engine(
    items: list[Any], indices: list[int] | None, *, ordered: bool = True, **options: Any
) -> tuple[MapEngine, FakeCluster]:
    cluster = FakeCluster(numbered({0: Finish(delay=4)}), slots=2)
    engine = MapEngine(
        cluster,  # type: ignore[arg-type]
        options.pop("fn", fake_draw),
        (items,),
        MapOptions(progress=False, **options),
        slots=cluster.slots,
        is_closed=cluster.is_closed,
        ordered=ordered,
        indices=indices,
    )
    engine.start()
    return engine, cluster


def fake_draw(x: int, rng: Any) -> float:
    return x + float(rng.random())


def fail_on_30(x: int) -> int:
    if x == 30:
        raise ValueError("thirty")
    return x


def test_an_engine_given_indices_seeds_reports_and_fails_by_them() -> None:
    indices = [3, 4, 9, 10, 11, 20, 30, 31]
    items = [10 * i for i in indices]
    for ordered in (True, False):
        engine, cluster = fake_engine(items, indices, seed=5, batch_size=3, ordered=ordered)
        chunks = [(list(i), list(v)) for i, v in engine.chunks()]
        got = {
            i: v
            for chunk_indices, values in chunks
            for i, v in zip(chunk_indices, values, strict=True)
        }
        assert got == {i: 10 * i + float(item_rng(5, i).random()) for i in indices}
        if ordered:
            assert [i for chunk_indices, _ in chunks for i in chunk_indices] == indices
        assert sorted(i for task in cluster.submitted for i in task.batch.indices) == indices
    engine, _ = fake_engine([1, 2, 30, 4], [7, 8, 9, 12], fn=fail_on_30, batch_size=2)
    with pytest.raises(TaskError) as info:
        list(engine.chunks())
    assert (info.value.index, info.value.item) == (9, 30)
    assert set(info.value.results) <= {7, 8, 12}


def test_a_cached_engine_merges_cached_and_computed_results_in_input_order(
    tmp_path: Path,
) -> None:
    items = list(range(100, 120))
    runs = [(True, set()), (True, {0, 1, 5, 6, 7, 19}), (False, {2, 3, 11}), (True, set(range(20)))]
    for number, (ordered, cached) in enumerate(runs):
        options = MapOptions(seed=5, cache=str(tmp_path / f"cache-{number}"), progress=False)
        cache = ResultCache.for_map(fake_draw, 1, options)
        assert cache is not None
        for index in cached:  # a previous run's results, as stored
            cache.add(ResultCache.key(index, items[index]), ("cached", index))
        cache.flush()
        cluster = FakeCluster(numbered({0: Finish(delay=4)}), slots=2)
        engine = CachedMapEngine(
            cluster,  # type: ignore[arg-type]
            fake_draw,
            (items,),
            options,
            cache=cache,
            slots=cluster.slots,
            is_closed=cluster.is_closed,
            ordered=ordered,
        )
        engine.start()
        chunks = [(list(i), list(v)) for i, v in engine.chunks()]
        got = {
            i: v
            for chunk_indices, values in chunks
            for i, v in zip(chunk_indices, values, strict=True)
        }
        fresh = {i: x + float(item_rng(5, i).random()) for i, x in enumerate(items)}
        assert got == {i: ("cached", i) if i in cached else fresh[i] for i in range(20)}
        if ordered:
            assert [i for chunk_indices, _ in chunks for i in chunk_indices] == list(range(20))
        computed = sorted(i for task in cluster.submitted for i in task.batch.indices)
        assert computed == sorted(set(range(20)) - cached)
        assert len(cache.load()) == 20  # every computed result was stored as it came


def test_storage_that_fails_mid_map_warns_and_loses_no_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = MapOptions(seed=5, cache=str(tmp_path / "cache"), progress=False)
    cache = ResultCache.for_map(fake_draw, 1, options)
    assert cache is not None

    def broken(self: ResultCache, entries: Any) -> None:
        raise OSError("the disk is full")

    monkeypatch.setattr(ResultCache, "_write", broken)
    cluster = FakeCluster(numbered({}), slots=2)
    engine = CachedMapEngine(
        cluster,  # type: ignore[arg-type]
        fake_draw,
        (list(range(30)),),
        options,
        cache=cache,
        slots=cluster.slots,
        is_closed=cluster.is_closed,
    )
    engine.start()
    with pytest.warns(CacheWriteWarning, match="the disk is full") as warned:
        values = [v for _, chunk in engine.chunks() for v in chunk]
    assert len(warned) == 1
    assert values == [x + float(item_rng(5, x).random()) for x in range(30)]
    monkeypatch.undo()
    cache.flush()  # the storage is back: what was held is stored
    assert len(cache.load()) == 30
