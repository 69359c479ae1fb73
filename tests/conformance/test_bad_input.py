"""Bad input on every provider (cloudmap.testing.bad_input), and an unknown provider's name."""

from __future__ import annotations

import pytest

import cloudmap
from cloudmap.testing import BadInputTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, BadInputTests):
    pass


class TestAzure(AzureEmulatorHarness, BadInputTests):
    pass


def test_unknown_provider_lists_the_known_ones() -> None:
    with pytest.raises(cloudmap.UnknownProviderError, match=r"known providers: .*local"):
        cloudmap.Pool("nowhere")
