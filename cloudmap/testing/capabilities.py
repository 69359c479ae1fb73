"""Provider capabilities: the names a harness declares, and how a test that needs one is skipped.

A conformance test that can only run where the provider (or its test harness) can do
something, such as preempt a spot node, says so with :func:`requires`. A provider's harness
declares what it can do as data (``ProviderHarness.capabilities``); tests needing anything
else are skipped, before any fixture starts, with a reason that names what is missing.
Capabilities are never inferred from a provider's name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest

#: Every capability a harness may declare, and what declaring it promises.
CAPABILITIES: dict[str, str] = {
    "spot": "the provider has spot nodes (Pool(spot_nodes=...)), which it may take back",
    "preempt": "the harness takes a spot node away at once (ProviderHarness.preempt)",
    "preempt_notice": "the harness preempts a spot node after a notice (preempt(notice=...))",
    "restore": "the harness brings preempted nodes back after a delay (ProviderHarness.restoring)",
    "restoring_state": "a preempted node that will come back says so (NodeInfo.restoring)",
    "evict": "the harness makes the provider preempt spot nodes at random (evicting)",
    "break_node": "the harness fails a node as a whole, as a VM fails (break_node)",
    "kill_agent": (
        "the harness kills cloudmap's processes on a node that the provider still calls "
        "healthy (kill_cloudmap_on)"
    ),
    "kill_slot": "the harness kills one slot process from outside (kill_slot)",
    "local_nodes": (
        "the nodes run on this machine: they see the test's files and tests look at their "
        "processes, addresses and Python"
    ),
    "mpi": "the nodes run multi-instance MPI tasks (Pool.mpi) with mpiexec",
}

#: Where :func:`requires` keeps the capabilities of a test function or class.
REQUIRED = "__cloudmap_requires__"

Test = TypeVar("Test", bound=Callable[..., Any])


def check_known(names: Iterable[str]) -> frozenset[str]:
    """The names as a set, or ValueError naming any that is not a capability (a typo)."""
    names = frozenset(names)
    unknown = sorted(names - CAPABILITIES.keys())
    if unknown:
        raise ValueError(
            f"unknown capabilities {unknown}; the known ones are {sorted(CAPABILITIES)} "
            "(cloudmap.testing.CAPABILITIES says what each means)"
        )
    return names


def requires(*names: str) -> Callable[[Test], Test]:
    """Mark a test (or a class of tests) as needing every capability in ``names``.

    Examples
    --------
    >>> @requires("spot", "preempt")
    ... def test_preempted_work_is_requeued(harness, pool): ...
    """
    needed = check_known(names)

    def mark(test: Test) -> Test:
        setattr(test, REQUIRED, needed | getattr(test, REQUIRED, frozenset()))
        return test

    return mark


def required(test: object, owner: type | None = None) -> frozenset[str]:
    """What ``test`` needs: its own marks plus those of the class it is collected in."""
    own: frozenset[str] = getattr(test, REQUIRED, frozenset())
    inherited: frozenset[str] = getattr(owner, REQUIRED, frozenset())
    return own | inherited


def skip_undeclared(cls: type, declared: frozenset[str], provider: str) -> None:
    """Replace each ``test*`` method of ``cls`` that needs an undeclared capability with a
    copy marked skip. A copy, because the method is shared with other providers' classes."""
    for name in dir(cls):
        if not name.startswith("test"):
            continue
        test = getattr(cls, name)
        if not callable(test):
            continue
        missing = sorted(required(test, cls) - declared)
        if missing:
            reason = (
                f"the {provider!r} harness does not declare the capabilit"
                f"{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))}"
            )
            setattr(cls, name, _skipped(test, reason))


def _skipped(test: Callable[..., Any], reason: str) -> Callable[..., Any]:
    @functools.wraps(test)  # keeps the signature (fixtures) and parametrize marks: same ids
    def skipped(*args: Any, **kwargs: Any) -> None:
        pytest.skip(reason)  # not reached: the skip mark acts before fixtures start

    marked: Callable[..., Any] = pytest.mark.skip(reason=reason)(skipped)
    return marked
