"""Azure pools from anywhere: the scheduler on a pool node, reached through Batch's inbound
NAT endpoint (``scheduler="node"``, decision 0008), on the Batch emulator.

The emulator gives every node a loopback address of its own (127.a.b.c) where its
processes listen, and each pool a public address whose frontend forwards only the
declared port, only from ``allow_from``. So these tests see what a laptop would: the
client connects out to the frontend and to nothing else, and nothing connects to it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import dask.config
import psutil
import pytest

import cloudmap
from cloudmap.errors import InputError, PoolStartError, SchedulerLostError
from cloudmap.progress import ProgressCounts
from cloudmap.providers.azure import AzureBatchProvider

from .batch_emulator import BatchEmulator, cloudmap_uses, running_batch_emulator

HERE = ["127.0.0.1/32"]  # where the tests' client connects from


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.1)
    return x * x


def rank_sum(comm: Any) -> int:
    return int(comm.allreduce(comm.rank + 1))


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchEmulator]:
    root = Path(tmp_path_factory.mktemp("scheduler-on-node"))
    # Batch nodes do not see the tests' modules: this one's functions travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with (
            running_batch_emulator(root, node_start_delay=0.05, page_size=50) as emulator,
            cloudmap_uses(emulator),
        ):
            yield emulator
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def remote_pool(**options: Any) -> cloudmap.Pool:
    return cloudmap.Pool(
        "azure",
        **{
            "nodes": 2,
            "scheduler": "node",
            "allow_from": HERE,
            "start_timeout": 60,
            "prices": cloudmap.NodePrices(dedicated=0.2, spot=0.05),
            **options,
        },
    )


@pytest.fixture(scope="module")
def pool(batch: BatchEmulator) -> Iterator[cloudmap.Pool]:
    with remote_pool() as made:
        made.wait_for_nodes(2)
        yield made


def pool_id(pool: cloudmap.Pool) -> str:
    provider = pool.provider
    assert isinstance(provider, AzureBatchProvider)
    return provider.pool_id


def scheduler_node_id(pool: cloudmap.Pool) -> str:
    provider = pool.provider
    assert isinstance(provider, AzureBatchProvider) and provider.scheduler_node is not None
    return provider.scheduler_node.node_id


def test_the_client_connects_out_to_the_frontend_and_to_nothing_else(
    batch: BatchEmulator, pool: cloudmap.Pool
) -> None:
    assert pool.map(square, range(40)) == [x * x for x in range(40)]
    client = batch.client()
    listed = list(client.list_nodes(pool_id(pool)))
    addresses = {node.ip_address for node in listed}
    public = batch.public_address(pool_id(pool))
    scheduler = next(n for n in listed if n.id == scheduler_node_id(pool))
    endpoint = scheduler.endpoint_configuration.inbound_endpoints[0]
    assert pool.scheduler_address == f"tls://{public}:{endpoint.frontend_port}"
    assert scheduler.ip_address not in pool.scheduler_address

    # What the frontend saw: only this client, only to the scheduler's node.
    seen = batch.connections(pool_id(pool))
    assert seen and all(c.allowed and c.source == "127.0.0.1" for c in seen)
    assert {c.frontend for c in seen} == {(public, endpoint.frontend_port)}
    assert {c.backend[0] for c in seen} == {scheduler.ip_address}
    relays = {c.relay for c in seen}

    # What this process holds: no connection to a node's address but the frontend's own
    # relays (the emulator runs in this process), and nothing listening but the emulator.
    mine = psutil.Process().net_connections(kind="inet")
    to_nodes = [c for c in mine if c.raddr and c.raddr.ip in addresses]
    assert to_nodes and all(tuple(c.laddr) in relays for c in to_nodes)
    listening = {tuple(c.laddr) for c in mine if c.status == psutil.CONN_LISTEN}
    emulator_port = int(batch.url.rsplit(":", 1)[1])
    assert all(ip == public or (ip, port) == ("127.0.0.1", emulator_port) for ip, port in listening)

    # The slots listen on their own nodes' addresses; the scheduler's node is no pool node.
    nodes = pool.nodes()
    assert len(nodes) == 2 and scheduler.id not in {n.id for n in nodes}
    workers = [w for n in nodes for w in n.workers]
    assert {w.split("//")[1].rsplit(":", 1)[0] for w in workers} <= addresses - {
        scheduler.ip_address
    }
    assert client.get_pool(pool_id(pool)).target_dedicated_nodes == 3


class Recorder:
    """A progress reporter that keeps what it was told."""

    def __init__(self) -> None:
        self.updates: list[int] = []
        self.closed: ProgressCounts | None = None

    def start(self, counts: ProgressCounts, description: str) -> None:
        self.updates.append(counts.done)

    def update(self, counts: ProgressCounts) -> None:
        self.updates.append(counts.done)

    def close(self, counts: ProgressCounts) -> None:
        self.closed = counts


def test_submit_progress_jobs_mpi_widgets_and_resize_work_through_it(
    pool: cloudmap.Pool,
) -> None:
    assert pool.submit(square, 7).result(timeout=30) == 49
    widget = pool.widget()
    assert widget.refresh() and widget.snapshot is not None
    # The scheduler's VM is billed too: 2 nodes and it.
    assert widget.snapshot.cost_per_hour == pytest.approx(0.6)
    assert "2" in widget.header.value
    recorder = Recorder()
    assert pool.map(slow_square, range(12), progress=recorder) == [x * x for x in range(12)]
    assert recorder.closed is not None and recorder.closed.done == 12
    with pool.job(prepare="echo prepared > prepared.txt") as job:
        assert job.map(square, range(4)) == [0, 1, 4, 9]
    pool.resize(nodes=3)
    pool.wait_for_nodes(3, timeout=60)
    assert len({n.id for n in pool.nodes()}) == 3
    pool.resize(nodes=2)
    pytest.importorskip("mpi4py", reason="install the cloudmap[mpi] extra")
    assert pool.mpi(rank_sum, nodes=2, ranks_per_node=2) == [10, 10, 10, 10]


def test_autoscale_decides_in_the_client_and_asks_batch(
    batch: BatchEmulator, pool: cloudmap.Pool
) -> None:
    pool.autoscale(cloudmap.Autoscale(min_nodes=2, max_nodes=3, interval=0.2, idle_timeout=60))
    try:
        assert pool.map(slow_square, range(80)) == [x * x for x in range(80)]
        assert max(s.target_dedicated for s in pool.scaling_history()) == 3
        # Batch's own target holds the scheduler's node too.
        assert batch.client().get_pool(pool_id(pool)).target_dedicated_nodes == 4
    finally:
        pool.autoscale(None)
        pool.resize(nodes=2)


def test_a_kept_pool_is_attached_again_with_a_scheduler_of_its_own(batch: BatchEmulator) -> None:
    with remote_pool(nodes=1, keep_pool=True) as kept:
        kept_id = pool_id(kept)
        first = scheduler_node_id(kept)
    assert batch.client().get_pool(kept_id).id == kept_id  # kept, still billing
    with remote_pool(nodes=1, pool_id=kept_id) as attached:
        assert attached.map(square, range(6)) == [0, 1, 4, 9, 16, 25]
        assert scheduler_node_id(attached) != first  # every node replaced, the scheduler's too
    batch.client().begin_delete_pool(kept_id, polling_interval=0.1).result(timeout=60)


def test_a_dropped_connection_is_survived_and_the_map_goes_on(
    batch: BatchEmulator, pool: cloudmap.Pool
) -> None:
    before = len(batch.connections(pool_id(pool)))
    results: list[Any] = []
    mapping = threading.Thread(target=lambda: results.append(pool.map(slow_square, range(40))))
    mapping.start()
    time.sleep(0.5)
    cut = time.time()
    batch.cut_frontend(pool_id(pool), 2.0)  # the laptop's Wi-Fi drops for 2 s
    mapping.join(timeout=60)
    assert results == [[x * x for x in range(40)]]
    after = batch.connections(pool_id(pool))[before:]
    assert any(c.allowed and c.time > cut + 2.0 for c in after), "it connected again"
    assert pool.submit(square, 3).result(timeout=30) == 9  # events and all, as before


def test_a_connection_lost_for_longer_than_allowed_fails_clearly(batch: BatchEmulator) -> None:
    with remote_pool(nodes=1, reconnect_timeout=1.5) as pool:
        cutter = threading.Timer(0.5, batch.cut_frontend, (pool_id(pool), 30.0))
        cutter.start()
        started = time.monotonic()
        with pytest.raises(SchedulerLostError, match=r"lost for more than 1\.5 s") as raised:
            pool.map(slow_square, range(200))
        assert time.monotonic() - started < 20
        assert isinstance(raised.value.results, dict)
        cutter.join()


def test_losing_the_schedulers_node_fails_the_pool_at_once(batch: BatchEmulator) -> None:
    with remote_pool(nodes=1) as pool:
        breaker = threading.Timer(0.5, batch.break_node, (pool_id(pool), scheduler_node_id(pool)))
        breaker.start()
        started = time.monotonic()
        with pytest.raises(SchedulerLostError, match="hosts the pool's scheduler is unusable"):
            pool.map(slow_square, range(400))
        assert time.monotonic() - started < 15
        breaker.join()


def test_a_client_outside_allow_from_is_refused_by_batch(batch: BatchEmulator) -> None:
    with pytest.raises(PoolStartError, match=r"allow_from=\[10.0.0.0/8\]"):
        remote_pool(nodes=1, allow_from=["10.0.0.0/8"], start_timeout=3)
    refused = [c for c in batch.all_connections() if c.source == "127.0.0.1" and not c.allowed]
    assert refused


# -- without an emulator: settings and plan ----------------------------------------------


def test_scheduler_on_a_node_needs_allow_from_and_refuses_the_whole_internet() -> None:
    options = {"account_url": "https://acct.westeurope.batch.azure.com", "scheduler": "node"}
    with pytest.raises(InputError, match=r"api\.ipify\.org"):
        cloudmap.Pool.plan("azure", **options)
    with pytest.raises(InputError, match="allow_anywhere=True"):
        cloudmap.Pool.plan("azure", **options, allow_from=["0.0.0.0/0"])
    with pytest.raises(InputError, match="CIDR"):
        cloudmap.Pool.plan("azure", **options, allow_from=["my laptop"])
    with pytest.raises(InputError, match="'node'"):
        cloudmap.Pool.plan("azure", account_url=options["account_url"], scheduler="cloud")
    opened = cloudmap.Pool.plan("azure", **options, allow_from="0.0.0.0/0", allow_anywhere=True)
    assert opened["requests"][0]["body"]["networkConfiguration"]


def test_plan_shows_the_endpoint_its_rules_and_the_two_steps() -> None:
    with dask.config.set({"cloudmap.azure.scheduler": None}):  # as packaged
        plan = cloudmap.Pool.plan(
            "azure",
            account_url="https://acct.westeurope.batch.azure.com",
            nodes=3,
            allow_from=["203.0.113.7/32", "198.51.100.0/24"],
        )  # no subnet_id: the scheduler runs on a node by default
    create, replace, resize = plan["requests"]
    body = create["body"]
    assert (body["targetDedicatedNodes"], body["enableInterNodeCommunication"]) == (1, True)
    (nat,) = body["networkConfiguration"]["endpointConfiguration"]["inboundNATPools"]
    assert (nat["backendPort"], nat["frontendPortRangeStart"]) == (8786, 40000)
    rules = nat["networkSecurityGroupRules"]
    assert [(r["access"], r["sourceAddressPrefix"]) for r in rules] == [
        ("allow", "203.0.113.7/32"),
        ("allow", "198.51.100.0/24"),
        ("deny", "*"),
    ]
    assert replace["path"].endswith("/updateproperties") and "startTask" in replace["body"]
    assert resize["body"]["targetDedicatedNodes"] == 4
    assert any("scheduler on a node" in note for note in plan["notes"])
    inside = cloudmap.Pool.plan(
        "azure", account_url="https://acct.westeurope.batch.azure.com", subnet_id="/sub/x"
    )
    assert len(inside["requests"]) == 1  # on the pool's network: the scheduler is here
