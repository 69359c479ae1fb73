"""Per-item generators and the rng signature check."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cloudmap import InputError, item_rng
from cloudmap.seeding import check_accepts_rng, check_seed


def test_item_rng_equals_spawned_seed_sequence() -> None:
    children = np.random.SeedSequence(7).spawn(5)
    for index, child in enumerate(children):
        expected = np.random.default_rng(child).random(3)
        assert np.array_equal(item_rng(7, index).random(3), expected)


def test_items_get_different_streams() -> None:
    assert item_rng(7, 0).random() != item_rng(7, 1).random()
    assert item_rng(7, 0).random() != item_rng(8, 0).random()


def f_rng(x: int, rng: Any) -> int:
    return x


def f_kwargs(x: int, **kwargs: Any) -> int:
    return x


def f_without(x: int) -> int:
    return x


def f_positional_only(x: int, rng: Any, /) -> int:
    return x


@pytest.mark.parametrize("fn", [f_rng, f_kwargs])
def test_functions_that_take_rng(fn: Any) -> None:
    check_accepts_rng(fn)


@pytest.mark.parametrize("fn", [f_without, f_positional_only])
def test_functions_that_cannot_take_rng(fn: Any) -> None:
    with pytest.raises(InputError, match="add an 'rng' keyword parameter"):
        check_accepts_rng(fn)


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True, None])
def test_bad_seeds(seed: Any) -> None:
    with pytest.raises(InputError, match="non-negative integer"):
        check_seed(seed)


def test_numpy_integer_seed() -> None:
    assert check_seed(np.int64(3)) == 3
