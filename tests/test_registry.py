"""Providers are found by name; unknown names list the known ones."""

from __future__ import annotations

import pytest

from cloudmap import UnknownProviderError
from cloudmap.providers import get_provider, known_providers, register_provider
from cloudmap.providers.local import LocalProvider


def test_local_is_registered() -> None:
    assert "local" in known_providers()
    assert get_provider("local") is LocalProvider


def test_unknown_name_lists_known_providers() -> None:
    with pytest.raises(UnknownProviderError, match=r"'nowhere'.*known providers: .*local"):
        get_provider("nowhere")


def test_registered_provider_with_missing_dependency_suggests_the_extra() -> None:
    register_provider("missing", "cloudmap_missing_module:Provider", extra="missing")
    with pytest.raises(ImportError, match=r'pip install "cloudmap\[missing\]"'):
        get_provider("missing")
