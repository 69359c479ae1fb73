"""Conformance: bad input to resize and autoscale on a live pool gets a specific error."""

from __future__ import annotations

import pytest

import cloudmap


class ElasticInputTests:
    """Bad resizes and autoscale settings on the shared pool, which they must leave as it was."""

    @pytest.mark.parametrize(
        ("sizes", "message"),
        [
            ({"nodes": -1}, "nodes=-1"),
            ({"spot_nodes": 1.5}, "spot_nodes=1.5"),
            ({"nodes": 1, "deallocation": "later"}, "deallocation='later'"),
        ],
    )
    def test_bad_resize(self, pool: cloudmap.Pool, sizes: dict[str, object], message: str) -> None:
        with pytest.raises(cloudmap.InputError, match=message):
            pool.resize(**sizes)  # type: ignore[arg-type]
        assert pool.targets == (2, 0)

    def test_unknown_autoscale_setting_on_a_live_pool(self, pool: cloudmap.Pool) -> None:
        with pytest.raises(cloudmap.InputError, match="max_nodes"):
            pool.autoscale(maximum=3)
