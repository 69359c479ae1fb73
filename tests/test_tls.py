"""A pool with tls=True: every connection is TLS with the pool's own temporary
certificates; a client without them is refused, and the key is never on a command line."""

from __future__ import annotations

import stat
from pathlib import Path

import psutil
import pytest
from distributed import Client, Security

import cloudmap
from cloudmap.node.layout import CONFIG_FILE


def double(x: int) -> int:
    return 2 * x


def test_a_tls_pool_works_and_refuses_clients_without_its_certificates(tmp_path: Path) -> None:
    with cloudmap.Pool(nodes=1, slots_per_node=2, tls=True, root=str(tmp_path)) as pool:
        assert pool.scheduler_address.startswith("tls://")
        assert pool.map(double, range(20)) == [2 * x for x in range(20)]

        with pytest.raises((OSError, TimeoutError)):
            Client(pool.scheduler_address.replace("tls://", "tcp://"), timeout=3)
        with pytest.raises((OSError, TimeoutError)):
            Client(pool.scheduler_address, timeout=3, security=Security.temporary())

        key = pool.provider.tls["key"]  # type: ignore[union-attr]
        assert "PRIVATE KEY" in key
        config = next(tmp_path.glob(f"*/{CONFIG_FILE}"))
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        tls_files = list(tmp_path.glob("*/tls/*.pem"))
        assert tls_files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in tls_files)
        for process in psutil.Process().children(recursive=True):
            assert "PRIVATE KEY" not in " ".join(process.cmdline())
        for log in tmp_path.glob("**/*.log"):
            assert "PRIVATE KEY" not in log.read_text(errors="replace")
        assert "PRIVATE KEY" not in repr(pool) and "PRIVATE KEY" not in repr(pool.spec)


def test_tls_must_be_a_boolean() -> None:
    with pytest.raises(cloudmap.InputError, match="tls="):
        cloudmap.Pool(nodes=1, tls="yes")  # type: ignore[arg-type]
