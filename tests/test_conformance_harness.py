"""The conformance harness's own logic: capabilities declared as data decide what is skipped.

Fast: no pool starts. The conformance suite itself is tests/conformance.
"""

from __future__ import annotations

from typing import Any

import pytest

from cloudmap.testing import CAPABILITIES, MissingCapabilityError, ProviderHarness, requires

pytest_plugins = ["pytester"]


class SharedTests:
    """Stands for a conformance class: tests written once, some needing capabilities."""

    def test_plain(self) -> None:
        assert True

    @requires("preempt")
    def test_needs_preempt(self) -> None:
        assert True

    @requires("spot", "preempt")
    @pytest.mark.parametrize("x", [1, 2])
    def test_needs_two(self, x: int) -> None:
        assert x


@requires("mpi")
class SharedMpiTests:
    def test_run(self) -> None:
        assert True


class NoFaults(ProviderHarness):
    provider = "nofaults"


class Preempting(ProviderHarness):
    provider = "preempting"
    capabilities = frozenset({"spot", "preempt"})


class DeclaresWithoutImplementing(ProviderHarness):
    provider = "lazy"
    capabilities = frozenset({"break_node"})


class WithoutFaults(NoFaults, SharedTests):
    pass


class WithPreemption(Preempting, SharedTests):
    pass


class WithoutMpi(NoFaults, SharedMpiTests):
    pass


def _skip_reason(test: Any) -> str | None:
    marks = [m for m in getattr(test, "pytestmark", []) if m.name == "skip"]
    return str(marks[0].kwargs["reason"]) if marks else None


def test_a_test_needing_an_undeclared_capability_is_skipped_naming_it() -> None:
    reason = _skip_reason(WithoutFaults.test_needs_preempt)
    assert reason is not None and "'preempt'" in reason and "'nofaults'" in reason
    reason = _skip_reason(WithoutFaults.test_needs_two)
    assert reason is not None and "capabilities 'preempt', 'spot'" in reason
    assert _skip_reason(WithoutFaults.test_plain) is None


def test_declared_capabilities_leave_the_test_as_it_is() -> None:
    assert WithPreemption.test_needs_preempt is SharedTests.test_needs_preempt
    assert WithPreemption.test_needs_two is SharedTests.test_needs_two


def test_skipping_for_one_provider_leaves_the_shared_test_alone_and_keeps_its_parameters() -> None:
    assert _skip_reason(SharedTests.test_needs_two) is None
    marks = {m.name for m in WithoutFaults.test_needs_two.pytestmark}  # type: ignore[attr-defined]
    assert marks == {"skip", "parametrize"}


def test_a_class_of_tests_can_require_a_capability() -> None:
    reason = _skip_reason(WithoutMpi.test_run)
    assert reason is not None and "'mpi'" in reason


def test_unknown_capabilities_are_refused_where_they_are_written() -> None:
    with pytest.raises(ValueError, match=r"unknown capabilities \['preemt'\]"):
        requires("preemt")
    with pytest.raises(TypeError, match=r"Typo\.capabilities: unknown capabilities"):

        class Typo(ProviderHarness):
            provider = "typo"
            capabilities = frozenset({"spto"})

    with pytest.raises(ValueError, match="unknown capabilities"):
        NoFaults().can("spto")


def test_every_capability_says_what_it_promises() -> None:
    assert all(isinstance(text, str) and text for text in CAPABILITIES.values())


def test_a_fault_action_without_its_capability_says_which_is_missing() -> None:
    with pytest.raises(MissingCapabilityError, match=r"'preempt_notice'.*does not declare it"):
        NoFaults().preempt(None, "node-0", notice=1.0)  # type: ignore[arg-type]
    with pytest.raises(MissingCapabilityError, match="'restore'"), NoFaults().restoring(1.0):
        pass
    with pytest.raises(MissingCapabilityError, match="declares it but does not implement it"):
        DeclaresWithoutImplementing().break_node(None, "node-0")  # type: ignore[arg-type]
    with pytest.raises(MissingCapabilityError, match="'local_nodes'"):
        NoFaults().node_processes()


def test_the_skip_comes_before_any_fixture_starts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from cloudmap.testing import ProviderHarness, requires

        class Shared:
            @pytest.fixture
            def expensive(self):
                raise AssertionError("a skipped test started its fixtures")

            @requires("break_node")
            def test_breaks_a_node(self, expensive):
                pass

            def test_runs(self):
                pass

        class Harness(ProviderHarness):
            provider = "bare"

        class TestBare(Harness, Shared):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*the 'bare' harness does not declare the capability 'break_node'*"]
    )
