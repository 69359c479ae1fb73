"""joblib's ``"cloudmap"`` backend on real local pools: where calls run, what errors look
like, scikit-learn's ``GridSearchCV(n_jobs=-1)``, and that registering it costs nothing
until joblib is imported."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import joblib
import pytest

import cloudmap


class Unlucky(Exception):
    """Raised by a task: must come back to joblib's caller as itself."""


def where(i: int) -> tuple[str | None, int, int]:
    time.sleep(0.1)  # long enough that both slots get batches
    return os.environ.get("CLOUDMAP_NODE_ID"), os.getpid(), i


def fails_on_three(i: int) -> int:
    if i == 3:
        raise Unlucky(f"item {i}")
    return i * i


def nested_sum(n: int) -> tuple[int, str]:
    """A ``Parallel`` call inside a task: runs in the slot, sequentially."""
    with joblib.parallel_config(backend="cloudmap"):
        total = sum(joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-i) for i in range(n)))
    backend, _ = joblib.parallel.get_active_backend()
    return total, type(backend).__name__


@pytest.fixture(scope="module")
def pool() -> Iterator[cloudmap.Pool]:
    """Two nodes of one slot; tests use ``parallel_config(pool=...)``, so the pool is not
    entered (``with pool:`` would close it at the end of the first test)."""
    with cloudmap.Pool(nodes=2, slots_per_node=1) as pool:
        pool.wait_for_nodes()
        yield pool


def test_parallel_runs_every_call_on_the_current_pools_slots() -> None:
    with cloudmap.Pool(nodes=2, slots_per_node=1) as pool:
        pool.wait_for_nodes()
        with joblib.parallel_config(backend="cloudmap"):
            assert joblib.effective_n_jobs(-1) == 2  # every slot
            assert joblib.effective_n_jobs(-2) == 1
            ran = joblib.Parallel(n_jobs=-1)(joblib.delayed(where)(i) for i in range(12))
        assert [i for _, _, i in ran] == list(range(12))  # in order
        assert {node for node, _, _ in ran} == {node.id for node in pool.nodes()}
        assert os.getpid() not in {pid for _, pid, _ in ran}
        assert len({pid for _, pid, _ in ran}) == 2


def test_an_explicit_pool_a_generator_and_the_defaults(pool: cloudmap.Pool) -> None:
    before = pool.task_counts().done
    with joblib.parallel_config(backend="cloudmap", pool=pool):
        squares = joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(20))
        unordered = joblib.Parallel(return_as="generator_unordered")(
            joblib.delayed(pow)(i, 2) for i in range(20)
        )
        assert sorted(unordered) == squares == [i * i for i in range(20)]
    assert pool.task_counts().done > before  # the batches ran as the pool's tasks


def test_an_error_in_a_task_is_raised_as_itself_and_the_backend_stays_usable(
    pool: cloudmap.Pool,
) -> None:
    with joblib.parallel_config(backend="cloudmap", pool=pool):
        with pytest.raises(Unlucky, match="item 3") as caught:
            joblib.Parallel(n_jobs=-1)(joblib.delayed(fails_on_three)(i) for i in range(8))
        cause = caught.value.__cause__
        assert isinstance(cause, cloudmap.TaskError)
        assert "fails_on_three" in cause.remote_traceback  # where it failed, on the node
        assert joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-i) for i in range(4)) == [
            0,
            1,
            2,
            3,
        ]


def test_timeout_raises_and_the_pool_goes_on(pool: cloudmap.Pool) -> None:
    # joblib raises multiprocessing's TimeoutError on a timeout, for loky too
    with (
        joblib.parallel_config(backend="cloudmap", pool=pool),
        pytest.raises(multiprocessing.TimeoutError),
    ):
        joblib.Parallel(n_jobs=-1, timeout=0.5)(joblib.delayed(time.sleep)(2) for _ in range(2))
    assert pool.submit(abs, -5).result(timeout=30) == 5


def test_parallel_inside_a_task_runs_sequentially_in_its_slot(pool: cloudmap.Pool) -> None:
    with joblib.parallel_config(backend="cloudmap", pool=pool):
        results = joblib.Parallel(n_jobs=-1)(joblib.delayed(nested_sum)(n) for n in (3, 4))
    assert [total for total, _ in results] == [3, 6]
    assert {name for _, name in results} == {"SequentialBackend"}  # the nested default


def test_bad_backend_options_say_what_to_pass(pool: cloudmap.Pool) -> None:
    with pytest.raises(cloudmap.InputError, match="pool= "):
        joblib.parallel_config(backend="cloudmap", workers=3)
    with pytest.raises(cloudmap.InputError, match=r"not a cloudmap\.Pool"):
        joblib.parallel_config(backend="cloudmap", pool="local")
    with (
        joblib.parallel_config(backend="cloudmap", pool=pool),
        pytest.raises(cloudmap.InputError, match="n_jobs=-1 for every slot"),
    ):
        joblib.Parallel(n_jobs=0)(joblib.delayed(abs)(i) for i in range(2))


def test_grid_search_gives_the_same_result_on_the_pool() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.model_selection import GridSearchCV
    from sklearn.tree import DecisionTreeClassifier

    X, y = make_classification(n_samples=200, n_features=6, random_state=0)
    grid = {"max_depth": [1, 2, 3, 5], "min_samples_leaf": [1, 5]}

    def search(n_jobs: int) -> GridSearchCV:
        model = DecisionTreeClassifier(random_state=0)
        return GridSearchCV(model, grid, cv=3, n_jobs=n_jobs).fit(X, y)

    here = search(n_jobs=1)
    with cloudmap.Pool(nodes=2) as pool, joblib.parallel_config(backend="cloudmap"):
        there = search(n_jobs=-1)
        assert pool.task_counts().done >= 2  # the folds ran as the pool's tasks
    assert there.best_params_ == here.best_params_
    assert there.best_score_ == here.best_score_
    assert list(there.cv_results_["mean_test_score"]) == list(here.cv_results_["mean_test_score"])


def test_cloudmap_is_a_joblib_backend_without_loading_joblib_or_dask() -> None:
    """Registered for joblib in either import order; ``import cloudmap`` alone (as on a
    node) loads neither joblib nor Dask, and registering loads no Dask either."""
    code = (
        "import importlib.util, sys, cloudmap\n"
        "assert 'joblib' not in sys.modules\n"
        "assert importlib.util.find_spec('joblib') is not None  # looks, imports nothing\n"
        "assert 'joblib' not in sys.modules\n"
        "import joblib\n"
        "assert 'cloudmap' in joblib.parallel.BACKENDS\n"
        "assert 'distributed' not in sys.modules and 'cloudmap.pool' not in sys.modules\n"
        "loader = type(sys.modules['joblib'].__loader__)\n"
        "assert loader.__module__ != 'cloudmap.joblib_registration'  # its own loader again\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    code = "import joblib, cloudmap\nassert 'cloudmap' in joblib.parallel.BACKENDS\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
