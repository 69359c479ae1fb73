"""Waiting in tests for something that happens on its own time, with a deadline."""

from __future__ import annotations

from collections.abc import Callable

from ..loops import poll_until


def eventually(check: Callable[[], object], seconds: float) -> bool:
    """Whether ``check()`` becomes true within ``seconds`` (polled every 50 ms)."""
    return bool(poll_until(check, seconds, interval=0.05))
