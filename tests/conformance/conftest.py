"""The conformance suite runs against every provider listed here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import cloudmap

PROVIDERS = ["local"]


@pytest.fixture(scope="module", params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def pool(provider: str) -> Iterator[cloudmap.Pool]:
    """A two-node pool shared by the tests of one module that do not disturb it."""
    with cloudmap.Pool(provider, nodes=2, slots_per_node=1) as shared:
        shared.wait_for_nodes()
        yield shared
