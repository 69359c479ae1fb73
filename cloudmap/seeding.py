"""Per-item random generators: an item gets the same numbers whatever node or batch runs it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InputError


def item_rng(seed: int, index: int) -> np.random.Generator:
    """Return the generator of item ``index`` under root ``seed``.

    It is ``numpy.random.default_rng(SeedSequence(seed).spawn(n)[index])`` computed directly,
    so it depends on nothing but the two numbers: node count, batch size, retries and
    preemption cannot change an item's stream.

    >>> float(item_rng(7, 3).random()) == float(item_rng(7, 3).random())
    True
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))


def check_seed(seed: object) -> int:
    """Validate a user's root seed: a non-negative int, as ``SeedSequence`` wants."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(
            f"seed={seed!r} is not usable: pass a non-negative integer (for example seed=7)"
        )
    return int(seed)


def check_accepts_rng(fn: Callable[..., Any]) -> None:
    """Fail early, before any work is sent, if ``fn`` cannot take the ``rng`` keyword."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and some C functions hide their signature: let the call decide
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return
        if parameter.name == "rng" and parameter.kind is not inspect.Parameter.POSITIONAL_ONLY:
            return
    name = getattr(fn, "__qualname__", repr(fn))
    raise InputError(
        f"seed= was given but {name}{signature} has no 'rng' parameter: cloudmap passes each "
        "item its own numpy Generator as rng=...; add an 'rng' keyword parameter "
        "(for example def f(x, rng): ...) or drop seed="
    )
