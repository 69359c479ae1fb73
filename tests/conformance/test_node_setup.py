"""Resource files and packages on every provider (cloudmap.testing.node_setup), and bad node
setup arguments, refused before any provider is asked."""

from __future__ import annotations

import pytest

import cloudmap
from cloudmap.testing import NodeSetupTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class TestLocal(LocalHarness, NodeSetupTests):
    pass


class TestAzure(AzureEmulatorHarness, NodeSetupTests):
    pass


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"resource_files": [("file:///x", "../escape")]}, "must stay inside"),
        ({"resource_files": [42]}, "resource_files entry 42"),
        ({"packages": [""]}, "not a pip requirement"),
        ({"storage_options": "secret"}, "storage_options must be a dict"),
    ],
)
def test_bad_node_setup_arguments(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(cloudmap.InputError, match=message):
        cloudmap.Pool(nodes=0, **arguments)  # type: ignore[arg-type]
