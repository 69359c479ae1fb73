"""Conformance: bad input gets a specific error that says what to do; nothing computed is lost."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import cloudmap

from . import tasks
from .harness import ProviderHarness


class BadInputTests:
    """Bad pool options, bad map options and input, a closed pool."""

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"nodes": -1}, "nodes=-1"),
            ({"slots_per_node": 0}, "slots_per_node=0"),
            ({"start_timeout": 0}, "start_timeout=0"),
            ({"start_task": 42}, "start_task=42"),
        ],
    )
    def test_bad_pool_options(
        self, harness: ProviderHarness, options: dict[str, object], message: str
    ) -> None:
        with pytest.raises(cloudmap.InputError, match=message):
            harness.make_pool(**options)

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"timeout": 0}, "timeout=0"),
            ({"timeout": -2.5}, "timeout=-2.5"),
            ({"retries": -1}, "retries=-1"),
            ({"batch_size": 0}, "batch_size=0"),
            ({"on_error": "ignore"}, "on_error='ignore'"),
            ({"seed": -3}, "seed=-3"),
        ],
    )
    def test_bad_map_options(
        self, pool: cloudmap.Pool, options: dict[str, object], message: str
    ) -> None:
        with pytest.raises(cloudmap.InputError, match=message):
            pool.map(tasks.square, range(3), **options)  # type: ignore[arg-type]

    def test_unpicklable_function(self, pool: cloudmap.Pool) -> None:
        lock = threading.Lock()
        with pytest.raises(cloudmap.SerializationError, match="cannot be pickled"):
            pool.map(lambda x: (lock, x), range(3))
        with pytest.raises(cloudmap.SerializationError):
            pool.submit(lambda: lock)

    def test_unpicklable_item_names_it_and_keeps_results(self, pool: cloudmap.Pool) -> None:
        items = [1, 2, 3, threading.Lock()]
        with pytest.raises(cloudmap.SerializationError, match="item 3") as caught:
            pool.map(tasks.no_rng, items, batch_size=1)
        assert caught.value.results == {0: 1, 1: 2, 2: 3} or set(caught.value.results) <= {0, 1, 2}

    def test_not_iterable(self, pool: cloudmap.Pool) -> None:
        with pytest.raises(cloudmap.InputError, match="not iterable"):
            pool.map(tasks.square, 5)  # type: ignore[arg-type]

    def test_iterables_of_different_lengths(self, pool: cloudmap.Pool) -> None:
        with pytest.raises(cloudmap.InputError, match="different lengths"):
            pool.map(tasks.add, [1, 2, 3], [1, 2])

    def test_generators_of_different_lengths_keep_finished_results(
        self, pool: cloudmap.Pool
    ) -> None:
        def numbers(n: int) -> Iterator[int]:
            yield from range(n)

        with pytest.raises(cloudmap.InputError, match="different lengths") as caught:
            pool.map(tasks.add, numbers(10), numbers(12), batch_size=3)
        assert all(caught.value.results[i] == 2 * i for i in caught.value.results)

    def test_function_without_rng_when_seeded(self, pool: cloudmap.Pool) -> None:
        with pytest.raises(cloudmap.InputError, match="no 'rng' parameter"):
            pool.map(tasks.no_rng, range(3), seed=1)

    def test_closed_pool(self, harness: ProviderHarness) -> None:
        pool = harness.make_pool(nodes=1)
        pool.close()
        pool.close()  # twice is fine
        for use in (
            lambda: pool.map(tasks.square, [1]),
            lambda: pool.submit(tasks.square, 1),
            lambda: pool.nodes(),
            lambda: pool.executor(),
        ):
            with pytest.raises(cloudmap.PoolClosedError, match="closed"):
                use()
        assert repr(pool) == "<cloudmap.Pool closed>"
