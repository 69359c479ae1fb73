"""function_hash: the same in fresh processes, different when what the function computes
changes, and a clear refusal when a captured value has no reproducible hash."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudmap import InputError
from cloudmap.fingerprint import function_hash, value_hash

#: A notebook-like cell: a helper, data with a set and a dict, a closure, a partial.
CELL = """
import functools
import numpy as np

SCALE = {"a": 2.5, "b": frozenset({"x", "y", "z"}), "c": {"p", "q", "r", "s"}}
WEIGHTS = np.arange(6, dtype=np.float64).reshape(2, 3)

def helper(x):
    return x * SCALE["a"] + len(SCALE["c"])

def make(offset):
    def inner(x, rng=None):
        return helper(x) + offset + WEIGHTS.sum() + rng.random()
    return inner

fn = functools.partial(make(3), rng=None)
square = lambda x: x * x
"""


def _cell(source: str = CELL, *, filename: str = "<cell-1>", blank_lines: int = 0) -> dict:
    """Run a cell as Jupyter would: compiled from a temporary file name."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile("\n" * blank_lines + source, filename, "exec"), namespace)
    return namespace


def _hash_in_fresh_process(hash_seed: str, filename: str, blank_lines: int) -> str:
    script = textwrap.dedent(
        f"""
        from cloudmap.fingerprint import function_hash
        namespace = {{"__name__": "__main__"}}
        source = {CELL!r}
        exec(compile("\\n" * {blank_lines} + source, {filename!r}, "exec"), namespace)
        print(function_hash(namespace["fn"]), function_hash(namespace["square"]))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_equal_functions_hash_equal_in_fresh_processes() -> None:
    """Set order, the cell's file name and its line numbers change; the hash does not."""
    first = _hash_in_fresh_process("1", "/tmp/ipykernel_1/111.py", 0)
    second = _hash_in_fresh_process("2", "/tmp/ipykernel_2/222.py", 7)
    assert first == second
    here = _cell()
    assert first == f"{function_hash(here['fn'])} {function_hash(here['square'])}"


def test_the_same_cell_run_again_hashes_equal() -> None:
    assert function_hash(_cell()["fn"]) == function_hash(_cell(filename="<cell-9>")["fn"])


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"a": 2.5', '"a": 2.25'),  # a global's value
        ('"r", "s"}', '"r", "t"}'),  # a member of a set in a global
        ("return x * SCALE", "return x + SCALE"),  # a helper's code
        ("make(3)", "make(4)"),  # a closure value
        ("rng.random()", "rng.normal()"),  # an attribute read
        ("dtype=np.float64", "dtype=np.float32"),  # an array's dtype
        ("rng=None)", "rng=None, offset=1)"),  # a partial's keywords
    ],
)
def test_a_change_changes_the_hash(old: str, new: str) -> None:
    assert old in CELL
    changed = _cell(CELL.replace(old, new))
    assert function_hash(changed["fn"]) != function_hash(_cell()["fn"])


def test_lambdas_differ_by_code_and_by_bound_values() -> None:
    assert function_hash(lambda x: x + 1) != function_hash(lambda x: x + 2)
    bound = [functools.partial(lambda x, v: x * v, v=v) for v in range(3)]
    assert len({function_hash(f) for f in bound}) == 3
    defaults = [lambda x, v=v: x * v for v in range(3)]
    assert len({function_hash(f) for f in defaults}) == 3
    # Late-bound: every lambda sees the loop's last value, so they do compute the same.
    late = _cell("fs = [lambda x: x * i for i in range(3)]")["fs"]
    assert len({function_hash(f) for f in late}) == 1
    assert [f(1) for f in late] == [2, 2, 2]


def test_recursion_and_shared_helpers_are_fine() -> None:
    source = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    fib = _cell(source)["fib"]
    assert function_hash(fib) == function_hash(_cell(source, blank_lines=3)["fib"])
    assert function_hash(fib) != function_hash(_cell(source.replace("n < 2", "n < 3"))["fib"])
    pair = _cell("def a(x):\n    return b(x)\ndef b(x):\n    return a(x) if x else 0\n")
    assert function_hash(pair["a"]) != function_hash(pair["b"])


def test_installed_functions_and_modules_by_name() -> None:
    assert function_hash(np.sqrt) == function_hash(np.sqrt)
    assert function_hash(np.sqrt) != function_hash(np.exp)
    assert function_hash(len) != function_hash(abs)
    assert function_hash(functools.partial(np.add, 1)) != function_hash(
        functools.partial(np.add, 2)
    )


def test_values_hash_canonically() -> None:
    assert value_hash({"b": 1, "a": 2}) == value_hash({"a": 2, "b": 1})
    assert value_hash(1) != value_hash(1.0) != value_hash(True)
    assert value_hash((1, 2)) != value_hash([1, 2])
    assert value_hash(np.float64(0.5)) != value_hash(np.float32(0.5))
    assert value_hash(np.zeros(3)) != value_hash(np.zeros((3, 1)))
    with pytest.raises(TypeError):
        value_hash(threading.Lock())


LOCK = threading.Lock()


def _uses_lock(x: int) -> Any:
    return LOCK, x


def test_an_unhashable_global_is_refused_by_name() -> None:
    with pytest.raises(InputError) as info:
        function_hash(_uses_lock)
    message = str(info.value)
    assert "_uses_lock" in message and "global 'LOCK'" in message
    assert "_thread.lock" in message
    assert "functools.partial" in message and "v=v" in message  # what to do, late binding


def test_an_unhashable_closure_value_and_generator_are_refused() -> None:
    handle = open(os.devnull)  # noqa: SIM115 - the open file is what is captured
    try:
        with pytest.raises(InputError, match="closure variable 'handle'"):
            function_hash(lambda x: handle.read())
    finally:
        handle.close()
    items = (i for i in range(3))
    with pytest.raises(InputError, match="generator"):
        function_hash(lambda x: next(items))


def test_best_effort_hash_never_raises() -> None:
    relaxed = function_hash(_uses_lock, strict=False)
    assert len(relaxed) == 64
    assert relaxed == function_hash(_uses_lock, strict=False)


class _Awkward:
    """An object whose pickled form cannot even be asked for."""

    def __reduce_ex__(self, protocol: object) -> Any:
        raise RuntimeError("no")


AWKWARD = _Awkward()


def _uses_awkward(x: int) -> Any:
    return AWKWARD, x


def test_best_effort_hash_survives_misbehaving_and_deep_values() -> None:
    with pytest.raises(InputError, match="global 'AWKWARD'"):
        function_hash(_uses_awkward)
    assert len(function_hash(_uses_awkward, strict=False)) == 64
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InputError, match="nested too deeply"):
        function_hash(lambda x: deep)
    assert len(function_hash(lambda x: deep, strict=False)) == 64


def test_the_hash_does_not_depend_on_the_current_directory(tmp_path: Any) -> None:
    """The checkout's cloudmap.egg-info is found first from its own folder; where a module
    is installed must be read from its file, not from what importlib.metadata finds."""
    script = (
        "import numpy as np\n"
        "from cloudmap.fingerprint import function_hash\n"
        "from cloudmap.testing import tasks\n"
        "print(function_hash(tasks.draw), function_hash(np.sqrt))\n"
    )
    repository = Path(__file__).resolve().parent.parent
    seen = set()
    for cwd in (repository, tmp_path):
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        seen.add(done.stdout.strip())
    assert len(seen) == 1


random = threading.Lock()  # a global that shares its name with an attribute read below


def _reads_the_attribute_only(x: int, rng: Any) -> float:
    return float(rng.random())


def test_attribute_names_are_not_taken_for_globals() -> None:
    assert len(function_hash(_reads_the_attribute_only)) == 64
