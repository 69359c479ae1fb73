"""Bad input to resize and autoscale on every provider (cloudmap.testing.elastic_input); bad
settings that need no pool; and the local provider's own preemption injection."""

from __future__ import annotations

import pytest

import cloudmap
from cloudmap.providers import register_provider
from cloudmap.providers.local import LocalProvider
from cloudmap.testing import ElasticInputTests

from .harnesses import AzureEmulatorHarness, LocalHarness


class _NoSpotProvider(LocalProvider):
    """The local provider without spot capacity, as some real providers are."""

    name = "no-spot"
    supports_spot = False


register_provider("no-spot", f"{__name__}:_NoSpotProvider")


class TestLocal(LocalHarness, ElasticInputTests):
    def test_preempting_an_unknown_node(self, pool: cloudmap.Pool) -> None:
        with pytest.raises(cloudmap.InputError, match=r"no node 'node-99'.*pool.nodes\(\)"):
            pool.provider.preempt("node-99")  # type: ignore[union-attr]

    def test_preempting_a_dedicated_node(self, pool: cloudmap.Pool) -> None:
        node = pool.nodes()[0].id
        with pytest.raises(cloudmap.InputError, match="only spot nodes are preempted"):
            pool.provider.preempt(node)  # type: ignore[union-attr]


class TestAzure(AzureEmulatorHarness, ElasticInputTests):
    pass


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_nodes": 5, "max_nodes": 2}, "min_nodes=5 is more than max_nodes=2"),
        ({"max_nodes": 0}, "max_nodes=0"),
        ({"idle_timeout": -1}, "idle_timeout=-1"),
        ({"step": 0}, "step=0"),
    ],
)
def test_bad_autoscale(settings: dict[str, object], message: str) -> None:
    with pytest.raises(cloudmap.InputError, match=message):
        cloudmap.Autoscale(**settings)  # type: ignore[arg-type]


def test_bad_eviction() -> None:
    with pytest.raises(cloudmap.InputError, match="rate_per_node_hour=-1"):
        cloudmap.Eviction(rate_per_node_hour=-1)


def test_spot_nodes_on_a_provider_without_them() -> None:
    with pytest.raises(cloudmap.InputError, match="has no spot nodes"):
        cloudmap.Pool("no-spot", nodes=1, spot_nodes=2)
    with pytest.raises(cloudmap.InputError, match="has no spot nodes"):
        cloudmap.Pool("no-spot", autoscale=cloudmap.Autoscale(spot=True))


def test_resize_of_a_closed_pool() -> None:
    pool = cloudmap.Pool(nodes=0)
    pool.close()
    with pytest.raises(cloudmap.PoolClosedError, match=r"create a new cloudmap\.Pool"):
        pool.resize(nodes=2)
    with pytest.raises(cloudmap.PoolClosedError):
        pool.autoscale(max_nodes=2)
