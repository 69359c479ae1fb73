"""The Azure Batch provider against the local Batch emulator, beyond the conformance suite:
what it sends, what it keeps secret, how it fails, and the plan and pools commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import dask.config
import psutil
import pytest
from azure.batch import models
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ResourceNotFoundError

import cloudmap
from cloudmap.providers.azure.settings import AzureSettings

from .batch_emulator import BatchEmulator, running_batch_emulator
from .conftest import eventually

pytestmark = pytest.mark.usefixtures("scheduler_in_the_client")

# Batch nodes do not share the client's files: this module's functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def environment(x: int) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("AZ_BATCH", "CLOUDMAP"))}


@pytest.fixture
def batch(tmp_path: Path) -> Iterator[BatchEmulator]:
    with running_batch_emulator(tmp_path / "batch", node_start_delay=0.05, page_size=3) as emu:
        yield emu


def options(batch: BatchEmulator, **more: Any) -> dict[str, Any]:
    return {
        "account_url": batch.url,
        "credential": batch.credential(),
        "python": sys.executable,
        "vm_size": "Standard_D2s_v5",
        **more,
    }


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    return subprocess.run(
        [sys.executable, "-m", "cloudmap", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )


def test_plan_prints_the_pool_body_without_credentials() -> None:
    done = cli(
        "plan", "--provider", "azure", "--vm-size", "Standard_D4s_v5",
        "--nodes", "2", "--spot-nodes", "4", "--slots-per-node", "4", "--scheduler", "client",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    (request,) = plan["requests"]
    assert (request["method"], request["path"]) == ("POST", "/pools")
    body = request["body"]
    assert body["vmSize"] == "Standard_D4s_v5"
    assert (body["targetDedicatedNodes"], body["targetLowPriorityNodes"]) == (2, 4)
    assert body["taskSlotsPerNode"] == 4
    assert body["startTask"]["waitForSuccess"] is True
    assert "cloudmap.node.batch_boot" in body["startTask"]["commandLine"]
    settings = {e["name"]: e["value"] for e in body["startTask"]["environmentSettings"]}
    assert settings["CLOUDMAP_NODE_CONFIG"].startswith("<secret")
    assert {m["name"] for m in body["metadata"]} >= {"cloudmap", "cloudmap-created"}
    assert plan["api_version"] == "2025-06-01"
    # The same from Python, with an MPI pool: inter-node communication, one Batch slot.
    mpi = cloudmap.Pool.plan("azure", nodes=2, slots_per_node=4, mpi=True)
    body = mpi["requests"][0]["body"]
    assert body["enableInterNodeCommunication"] is True and body["taskSlotsPerNode"] == 1
    # From a laptop (no subnet): the scheduler's endpoint and its rules, in two steps.
    done = cli("plan", "--provider", "azure", "--nodes", "2", "--allow-from", "203.0.113.7/32")
    assert done.returncode == 0, done.stderr
    create, _, resize = json.loads(done.stdout)["requests"]
    (nat,) = create["body"]["networkConfiguration"]["endpointConfiguration"]["inboundNATPools"]
    assert nat["networkSecurityGroupRules"][0]["sourceAddressPrefix"] == "203.0.113.7/32"
    assert resize["body"]["targetDedicatedNodes"] == 3
    refused = cli("plan", "--provider", "azure", "--nodes", "2")
    assert refused.returncode != 0 and "allow_from" in refused.stderr


def test_settings_come_from_keywords_then_dask_config_then_defaults() -> None:
    assert AzureSettings.resolve().vm_size == "Standard_D4s_v5"  # azure.yaml
    with dask.config.set({"cloudmap.azure.vm_size": "Standard_D8s_v5"}):
        assert AzureSettings.resolve().vm_size == "Standard_D8s_v5"
        assert AzureSettings.resolve(vm_size="Standard_D2s_v5").vm_size == "Standard_D2s_v5"
    for bad, message in [
        ({"vm_size": ""}, "vm_size"),
        ({"image": {"publisher": "x"}}, "image"),
        ({"account_url": "ftp://x"}, "account_url"),
        ({"resize_timeout": 0}, "resize_timeout"),
        ({"colour": "blue"}, "does not take colour"),
    ]:
        with pytest.raises(cloudmap.InputError, match=message):
            AzureSettings.resolve(**bad)
    with pytest.raises(cloudmap.InputError, match="account_url"):
        cloudmap.Pool("azure", nodes=1)


def test_a_pool_on_batch_sends_the_right_body_keeps_secrets_and_goes_away(
    batch: BatchEmulator,
) -> None:
    with cloudmap.Pool("azure", nodes=2, slots_per_node=2, **options(batch)) as pool:
        assert pool.scheduler_address.startswith("tls://")
        assert pool.map(square, range(30)) == [x * x for x in range(30)]
        pool_id = pool.provider.pool_id  # type: ignore[union-attr]
        sent = batch.client().get_pool(pool_id)
        assert (sent.vm_size, sent.task_slots_per_node) == ("Standard_D2s_v5", 2)
        assert {m.name for m in sent.metadata} >= {"cloudmap", "cloudmap-client"}
        env = pool.map(environment, [0])[0]
        assert env["AZ_BATCH_POOL_ID"] == pool_id
        assert env["CLOUDMAP_NODE_ID"] == env["AZ_BATCH_NODE_ID"]
        assert "CLOUDMAP_NODE_CONFIG" not in env  # the secrets stop at the bootstrap
        key = pool.provider.tls["key"]  # type: ignore[union-attr]
        for process in psutil.Process().children(recursive=True):
            try:
                assert "PRIVATE KEY" not in " ".join(process.cmdline())
            except psutil.NoSuchProcess:
                continue
        planned = pool.planned()["requests"][0]["body"]  # what this pool asked for
        assert (planned["id"], planned["vmSize"]) == (pool_id, "Standard_D2s_v5")
        shown = repr(pool) + repr(pool.provider.settings) + repr(pool.spec)  # type: ignore[union-attr]
        shown += json.dumps(pool.planned())
        assert key not in shown and batch.key not in shown
    with pytest.raises(ResourceNotFoundError):
        batch.client().get_pool(pool_id)


def test_quota_errors_surface_with_batchs_codes(batch: BatchEmulator) -> None:
    batch.set_quota(dedicated_cores=0)
    with pytest.raises(cloudmap.PoolStartError, match="AccountCoreQuotaReached"):
        cloudmap.Pool("azure", nodes=2, start_timeout=60, **options(batch))
    assert list(batch.client().list_pools()) == []  # what failed to start was deleted


def test_a_quota_reached_after_start_is_reported_while_the_pool_is_short(
    batch: BatchEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    from cloudmap.widgets.render import pool_html
    from cloudmap.widgets.summary import pool_snapshot

    with cloudmap.Pool("azure", nodes=1, **options(batch)) as pool:
        pool.wait_for_nodes()
        assert pool.allocation_errors() == []
        batch.set_quota(dedicated_cores=2)  # the one D2s_v5 node already uses both
        pool.resize(nodes=3)
        assert eventually(pool.allocation_errors, 30)
        (error,) = pool.allocation_errors()
        assert error.startswith("AccountCoreQuotaReached: ")
        assert "the pool has 1 of 3 dedicated" in caplog.text and "CoreQuotaReached" in caplog.text
        assert "short of target: AccountCoreQuotaReached" in pool_html(pool_snapshot(pool))
        assert pool.map(square, range(4)) == [0, 1, 4, 9]  # the node it has still serves
        pool.resize(nodes=1)  # back within the quota: nothing stands in the way any more
        assert eventually(lambda: pool.allocation_errors() == [], 10)


def test_an_allocation_that_never_completes_times_out(batch: BatchEmulator) -> None:
    batch.fail_allocations("cloudmap-stalled")
    with pytest.raises(cloudmap.PoolStartError, match="AllocationTimedout"):
        cloudmap.Pool(
            "azure", nodes=1, start_timeout=60, **options(batch, pool_id="cloudmap-stalled",
                                                          resize_timeout=1)
        )  # fmt: skip
    assert list(batch.client().list_pools()) == []


def test_a_wrong_key_is_a_clear_error_and_leaves_nothing(batch: BatchEmulator) -> None:
    wrong = AzureNamedKeyCredential(batch.account, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ==")
    with pytest.raises(cloudmap.PoolStartError, match="AuthenticationFailed"):
        cloudmap.Pool("azure", nodes=1, **options(batch, credential=wrong))
    assert list(batch.client().list_pools()) == []


def test_a_node_running_another_cloudmap_refuses_to_start_and_says_why(
    batch: BatchEmulator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The client claims another version; the nodes run this checkout's own cloudmap.
    monkeypatch.setattr(cloudmap, "__version__", "0.0.0+elsewhere")
    with pytest.raises(cloudmap.PoolStartError) as raised:
        cloudmap.Pool("azure", nodes=1, start_timeout=60, **options(batch))
    message = str(raised.value)
    assert "the client runs cloudmap 0.0.0+elsewhere (node: " in message, message
    assert "install=" in message
    assert list(batch.client().list_pools()) == []
    # Reading start task files that do not exist (404) leaves no SDK tracebacks behind.
    assert "deserialization error" not in caplog.text


def test_a_kept_pool_is_found_attached_to_and_deleted_by_the_pools_command(
    batch: BatchEmulator,
) -> None:
    with cloudmap.Pool("azure", nodes=1, **options(batch, keep_pool=True)) as pool:
        pool_id = pool.provider.pool_id  # type: ignore[union-attr]
    assert batch.client().get_pool(pool_id).id == pool_id  # still there, still billing

    # Another client takes it over: fresh nodes join this client's scheduler.
    with cloudmap.Pool("azure", nodes=2, **options(batch, pool_id=pool_id)) as attached:
        attached.wait_for_nodes(timeout=60)
        assert attached.map(square, range(6)) == [0, 1, 4, 9, 16, 25]
    assert batch.client().get_pool(pool_id).id == pool_id  # attached pools are kept

    foreign = models.BatchPoolCreateOptions(
        {
            "id": "not-ours",
            "vmSize": "Standard_D2s_v5",
            "virtualMachineConfiguration": {
                "imageReference": {"publisher": "p", "offer": "o", "sku": "s"},
                "nodeAgentSKUId": "batch.node.ubuntu 24.04",
            },
        }
    )
    batch.client().create_pool(foreign)
    env = {"AZURE_BATCH_ACCOUNT": batch.account, "AZURE_BATCH_ACCESS_KEY": batch.key}
    listed = cli("pools", "list", "--account-url", batch.url, env=env)
    assert listed.returncode == 0, listed.stderr
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in records] == [pool_id]
    refused = cli("pools", "delete", "not-ours", "--account-url", batch.url, env=env)
    assert refused.returncode == 2 and "not made by cloudmap" in refused.stderr
    deleted = cli("pools", "delete", "--all", "--account-url", batch.url, env=env)
    assert deleted.returncode == 0 and f"deleted {pool_id}" in deleted.stdout, deleted.stderr
    assert [p.id for p in batch.client().list_pools()] == ["not-ours"]
    with pytest.raises(cloudmap.InputError, match="not made by cloudmap"):
        cloudmap.Pool("azure", nodes=1, **options(batch, pool_id="not-ours"))


def test_batch_autoscale_formula_for_long_lived_pools(batch: BatchEmulator) -> None:
    with cloudmap.Pool("azure", nodes=1, spot_nodes=1, **options(batch)) as pool:
        policy = cloudmap.Autoscale(min_nodes=1, max_nodes=4, spot=True, step=2)
        formula = pool.provider.enable_batch_autoscale(policy)  # type: ignore[union-attr]
        sent = batch.client().get_pool(pool.provider.pool_id)  # type: ignore[union-attr]
        assert sent.enable_auto_scale is True and sent.auto_scale_formula == formula
        assert "$TargetLowPriorityNodes" in formula and "min(4," in formula
