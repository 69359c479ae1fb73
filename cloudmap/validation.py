"""Checks of numeric arguments, shared by the pool's and the map's options."""

from __future__ import annotations

from .errors import InputError


def check_int(name: str, value: object, *, minimum: int) -> None:
    """An int (not a bool) of at least ``minimum``, or an InputError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}={value!r} is not valid: pass an integer >= {minimum}")


def check_positive(name: str, value: object) -> None:
    """A number of seconds > 0, or an InputError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"{name}={value!r} is not valid: pass a number of seconds > 0")
