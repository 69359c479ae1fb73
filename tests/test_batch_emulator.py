"""The Batch emulator, driven through the real ``azure-batch`` SDK.

These tests pin down what cloudmap's Azure provider relies on: that the SDK's requests are
accepted (Shared Key signatures, paging, pollers), that pools and nodes go through Batch's
states with Batch's field names, and that node processes live and die with their nodes.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("azure.batch")

from azure.batch import models as m
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.core.rest import HttpRequest

from tests.batch_emulator import (
    API_VERSION,
    AUTOSCALE_RESIZE_CONFLICT,
    NODE_HOST_VARIABLE,
    BatchEmulator,
    running_batch_emulator,
)

POLL = 0.05  # the SDK pollers' interval (its default is 5 s)
LEAVES_SLEEP = "echo hi; echo $AZ_BATCH_NODE_ID > $AZ_BATCH_NODE_SHARED_DIR/id; sleep 30 &"


@pytest.fixture
def batch(tmp_path: Path) -> Iterator[BatchEmulator]:
    with running_batch_emulator(tmp_path / "batch", node_start_delay=0.1) as emulator:
        yield emulator
    leftovers = [p for p in psutil.process_iter() if _cwd_under(p, tmp_path)]
    assert not leftovers, f"node processes survived the emulator: {leftovers}"


def _cwd_under(process: psutil.Process, root: Path) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE and process.cwd().startswith(str(root))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def pool_options(pool_id: str, **kwargs: Any) -> m.BatchPoolCreateOptions:
    kwargs.setdefault("vm_size", "Standard_D2s_v5")
    return m.BatchPoolCreateOptions(
        id=pool_id,
        virtual_machine_configuration=m.VirtualMachineConfiguration(
            image_reference=m.BatchVmImageReference(
                publisher="canonical", offer="ubuntu-24_04-lts", sku="server"
            ),
            node_agent_sku_id="batch.node.ubuntu 24.04",
        ),
        **kwargs,
    )


def start_task(command: str, **kwargs: Any) -> m.BatchStartTask:
    kwargs.setdefault("wait_for_success", True)
    return m.BatchStartTask(command_line=command, **kwargs)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        time.sleep(0.05)


def nodes_in(client: Any, pool_id: str, *states: str) -> list[m.BatchNode]:
    """All nodes of the pool once every one is in one of ``states`` (else an empty list)."""
    nodes = list(client.list_nodes(pool_id))
    return nodes if nodes and all(n.state in states for n in nodes) else []


def alive(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            continue
    return found


def read_file(client: Any, pool_id: str, node_id: str, path: str) -> bytes:
    return b"".join(client.download_node_file(pool_id, node_id, path))


def status_of(client: Any, method: str, path: str) -> int:
    """Send a signed request through the SDK's pipeline and return the bare HTTP status."""
    sep = "&" if "?" in path else "?"
    return client.send_request(
        HttpRequest(method, f"{path}{sep}api-version={API_VERSION}")
    ).status_code


def test_nodes_run_their_start_task_and_die_with_the_pool(batch: BatchEmulator) -> None:
    client = batch.client()
    listed = "env | grep -e ^AZ_BATCH_ -e ^EXTRA= -e ^CLOUDMAP_NODE_HOST= | sort > env.txt; "
    command = listed + LEAVES_SLEEP
    client.create_pool(
        pool_options(
            "work",
            target_dedicated_nodes=2,
            target_low_priority_nodes=1,
            enable_inter_node_communication=True,
            metadata=[m.BatchMetadataItem(name="owner", value="tests")],
            start_task=start_task(
                command, environment_settings=[m.EnvironmentSetting(name="EXTRA", value="1")]
            ),
        )
    )
    pool = client.get_pool("work")
    assert pool.allocation_state == "resizing"
    assert pool.metadata[0].value == "tests"
    nodes = wait_for(lambda: nodes_in(client, "work", "idle"))
    pool = client.get_pool("work")
    assert (pool.allocation_state, pool.state) == ("steady", "active")
    assert (pool.current_dedicated_nodes, pool.current_low_priority_nodes) == (2, 1)
    assert pool.resize_errors is None

    assert sorted(n.is_dedicated for n in nodes) == [False, True, True]
    addresses = [node.ip_address for node in nodes]
    assert len(set(addresses)) == 3, "each node has an address of its own"
    for node in nodes:
        assert node.id.startswith("tvmps_")
        assert node.ip_address.startswith("127.") and not node.ip_address.startswith("127.0.")
        assert node.vm_size == "Standard_D2s_v5" and node.total_tasks_run == 0
        info = node.start_task_info
        assert (info.state, info.exit_code, info.result, info.retry_count) == (
            "completed",
            0,
            "success",
            0,
        )
        assert read_file(client, "work", node.id, "startup/stdout.txt") == b"hi\n"
        assert (batch.node_dir("work", node.id) / "shared" / "id").read_text() == node.id + "\n"
        env = dict(
            line.split("=", 1)
            for line in read_file(client, "work", node.id, "startup/wd/env.txt").decode().split()
        )
        assert env["AZ_BATCH_NODE_ID"] == node.id
        assert env["AZ_BATCH_POOL_ID"] == "work"
        assert env["AZ_BATCH_ACCOUNT_NAME"] == batch.account
        assert env["AZ_BATCH_ACCOUNT_URL"] == batch.url
        assert env["AZ_BATCH_NODE_IS_DEDICATED"] == str(node.is_dedicated).lower()
        assert env["AZ_BATCH_TASK_WORKING_DIR"].endswith(f"{node.id}/startup/wd")
        assert sorted(env["AZ_BATCH_HOST_LIST"].split(",")) == sorted(addresses)
        assert env[NODE_HOST_VARIABLE] == node.ip_address
        assert env["EXTRA"] == "1"
        assert client.get_node("work", node.id).state == "idle"

    # The SDK streams downloads and raises before reading an error's body, so the error code
    # shows only on a request that is not streamed.
    with pytest.raises(ResourceNotFoundError) as streamed:
        read_file(client, "work", nodes[0].id, "startup/nope.txt")
    assert streamed.value.status_code == 404 and streamed.value.error is None
    with pytest.raises(ResourceNotFoundError) as missing:
        status_of(client, "GET", f"/pools/work/nodes/{nodes[0].id}/files/startup%2Fnope.txt")
    assert missing.value.error.code == "FileNotFound"
    with pytest.raises(HttpResponseError) as escape:
        read_file(client, "work", nodes[0].id, "../../../etc/passwd")
    assert escape.value.status_code == 400
    properties = client.get_node_file_properties("work", nodes[0].id, "startup/stdout.txt")
    assert (properties.content_length, properties.is_directory) == (3, False)

    pids = batch.node_processes("work")
    assert all(len(alive(p)) == 1 for p in pids.values())  # the start task's `sleep 30 &`

    assert status_of(client, "DELETE", "/pools/work") == 202
    assert client.get_pool("work").state == "deleting"
    with pytest.raises(ResourceExistsError) as again:
        client.begin_delete_pool("work")
    assert again.value.error.code == "PoolBeingDeleted"
    wait_for(lambda: "work" not in {p.id for p in client.list_pools()})
    with pytest.raises(ResourceNotFoundError) as gone:
        client.get_pool("work")
    assert gone.value.error.code == "PoolNotFound"
    assert not alive([pid for p in pids.values() for pid in p])


def test_lists_are_paged_and_filtered(batch: BatchEmulator) -> None:
    client = batch.client()
    for i in range(5):
        client.create_pool(pool_options(f"page-{i}"))
    client.create_pool(pool_options("other", target_dedicated_nodes=3))

    raw = client.send_request(HttpRequest("GET", f"/pools?api-version={API_VERSION}")).json()
    assert len(raw["value"]) == 2 and raw["odata.nextLink"].startswith(batch.url)
    assert [p.id for p in client.list_pools()] == ["other"] + [f"page-{i}" for i in range(5)]
    selected = list(client.list_pools(filter="startswith(id,'page-')", max_results=1))
    assert [p.id for p in selected] == [f"page-{i}" for i in range(5)]
    assert [p.id for p in client.list_pools(filter="id eq 'page-3'")] == ["page-3"]
    only_ids = list(client.list_pools(select=["id", "state"], filter="state eq 'active'"))
    assert len(only_ids) == 6 and only_ids[0].vm_size is None

    nodes = wait_for(lambda: nodes_in(client, "other", "idle"))
    assert len(nodes) == 3  # two pages of two
    assert len(list(client.list_nodes("other", filter="state eq 'idle'", max_results=1))) == 3
    with pytest.raises(HttpResponseError) as bad:
        list(client.list_pools(filter="id gt 'a'"))
    assert (bad.value.status_code, bad.value.error.code) == (400, "InvalidQueryParameterValue")


def test_resize_up_and_down(batch: BatchEmulator) -> None:
    client = batch.client()
    client.create_pool(
        pool_options("grow", target_dedicated_nodes=1, start_task=start_task("sleep 30 &"))
    )
    wait_for(lambda: nodes_in(client, "grow", "idle"))

    resize = m.BatchPoolResizeOptions(target_dedicated_nodes=3, target_low_priority_nodes=1)
    assert status_of(client, "GET", "/pools/grow") == 200
    client.begin_resize_pool("grow", resize, polling_interval=POLL).result()
    pool = client.get_pool("grow")
    assert pool.allocation_state == "steady"
    assert (pool.current_dedicated_nodes, pool.current_low_priority_nodes) == (3, 1)
    nodes = wait_for(lambda: nodes_in(client, "grow", "idle"))
    before = batch.node_processes("grow")
    assert len(before) == 4 and all(alive(p) for p in before.values())

    shrink = m.BatchPoolResizeOptions(target_dedicated_nodes=1, node_deallocation_option="requeue")
    client.begin_resize_pool("grow", shrink, polling_interval=POLL).result()
    left = {n.id for n in client.list_nodes("grow")}
    assert len(left) == 1 and left < {n.id for n in nodes}
    pool = client.get_pool("grow")
    assert (pool.target_dedicated_nodes, pool.target_low_priority_nodes) == (1, 0)
    assert not alive([pid for node, p in before.items() if node not in left for pid in p])
    kept = [pid for node, p in before.items() if node in left for pid in p]
    assert alive(kept)

    client.begin_delete_pool("grow", polling_interval=POLL).result()
    with pytest.raises(ResourceNotFoundError):
        client.get_pool("grow")
    assert not alive(kept)


def test_remove_nodes_and_stop_resize(batch: BatchEmulator) -> None:
    client = batch.client()
    client.create_pool(
        pool_options("trim", target_dedicated_nodes=3, start_task=start_task("sleep 30 &"))
    )
    nodes = wait_for(lambda: nodes_in(client, "trim", "idle"))
    victim = nodes[0].id
    pids = batch.node_processes("trim")[victim]
    options = m.BatchNodeRemoveOptions(node_ids=[victim], node_deallocation_option="terminate")
    client.begin_remove_nodes("trim", options, polling_interval=POLL).result()
    assert victim not in {n.id for n in client.list_nodes("trim")}
    assert client.get_pool("trim").target_dedicated_nodes == 2
    assert not alive(pids)
    with pytest.raises(ResourceNotFoundError) as unknown:
        client.begin_remove_nodes("trim", options, polling_interval=POLL)
    assert unknown.value.error.code == "NodeNotFound"

    batch.fail_allocations("trim")  # the next allocation never completes...
    client.begin_resize_pool(
        "trim", m.BatchPoolResizeOptions(target_dedicated_nodes=4), polling_interval=POLL
    )
    time.sleep(0.3)
    assert client.get_pool("trim").allocation_state == "resizing"
    with pytest.raises(ResourceExistsError) as busy:
        client.begin_resize_pool("trim", m.BatchPoolResizeOptions(target_dedicated_nodes=1))
    assert busy.value.error.code == "PoolBeingResized"
    client.begin_stop_pool_resize("trim", polling_interval=POLL).result()  # ...until stopped
    pool = client.get_pool("trim")
    assert (pool.allocation_state, pool.current_dedicated_nodes) == ("steady", 2)
    assert [e.code for e in pool.resize_errors] == ["ResizeStopped"]

    resize = m.BatchPoolResizeOptions(target_dedicated_nodes=3, resize_timeout=timedelta(seconds=1))
    started = time.monotonic()
    client.begin_resize_pool("trim", resize, polling_interval=POLL).result()
    assert time.monotonic() - started >= 0.9
    pool = client.get_pool("trim")
    assert [e.code for e in pool.resize_errors] == ["AllocationTimedout"]
    assert pool.current_dedicated_nodes == 2


def test_preempted_node_stays_listed_without_processes(batch: BatchEmulator) -> None:
    client = batch.client()
    client.create_pool(
        pool_options("spot", target_low_priority_nodes=1, start_task=start_task(LEAVES_SLEEP))
    )
    (node,) = wait_for(lambda: nodes_in(client, "spot", "idle"))
    pids = batch.node_processes("spot")[node.id]
    assert alive(pids)
    batch.preempt("spot", node.id)
    assert client.get_node("spot", node.id).state == "preempted"
    assert not alive(pids)
    pool = client.get_pool("spot")
    assert (pool.current_low_priority_nodes, pool.target_low_priority_nodes) == (1, 1)
    # Shrinking gives up the preempted node first.
    shrink = m.BatchPoolResizeOptions(target_low_priority_nodes=0)
    client.begin_resize_pool("spot", shrink, polling_interval=POLL).result()
    assert list(client.list_nodes("spot")) == []


def test_failing_start_task_is_retried_then_marks_the_node(batch: BatchEmulator) -> None:
    client = batch.client()
    failing = start_task("echo boom >&2; exit 3", max_task_retry_count=1)
    client.create_pool(pool_options("broken", target_dedicated_nodes=1, start_task=failing))
    (node,) = wait_for(lambda: nodes_in(client, "broken", "starttaskfailed"))
    info = node.start_task_info
    assert (info.state, info.result, info.exit_code, info.retry_count) == (
        "completed",
        "failure",
        3,
        1,
    )
    assert (info.failure_info.category, info.failure_info.code) == ("usererror", "FailureExitCode")
    assert read_file(client, "broken", node.id, "startup/stderr.txt") == b"boom\n"


def test_core_quota_stops_allocation(batch: BatchEmulator) -> None:
    client = batch.client()
    batch.set_quota(dedicated_cores=4)
    client.create_pool(pool_options("big", vm_size="Standard_D4s_v5", target_dedicated_nodes=2))
    pool = wait_for(lambda: (p := client.get_pool("big")).allocation_state == "steady" and p)
    assert (pool.current_dedicated_nodes, pool.target_dedicated_nodes) == (1, 2)
    (error,) = pool.resize_errors
    assert error.code == "AccountCoreQuotaReached" and "core quota" in error.message
    assert {v.name: v.value for v in error.error_values}["CoreQuota"] == "4"

    batch.set_quota(low_priority_cores=0)
    shrink = m.BatchPoolResizeOptions(target_dedicated_nodes=1, target_low_priority_nodes=1)
    client.begin_resize_pool("big", shrink, polling_interval=POLL).result()
    codes = [e.code for e in client.get_pool("big").resize_errors]
    assert codes == ["AccountLowPriorityCoreQuotaReached"]


def test_autoscale_enable_disable(batch: BatchEmulator) -> None:
    client = batch.client()
    client.create_pool(pool_options("auto"))

    def status(response: Any, *_: Any) -> int:
        return response.http_response.status_code

    formula = "$TargetDedicatedNodes = 2;\n$TargetLowPriorityNodes = 0;"
    options = m.BatchPoolEnableAutoScaleOptions(
        auto_scale_formula=formula, auto_scale_evaluation_interval=timedelta(minutes=5)
    )
    assert client.enable_pool_auto_scale("auto", options, cls=status) == 200
    pool = client.get_pool("auto")
    assert pool.enable_auto_scale and pool.auto_scale_formula == formula
    assert pool.auto_scale_evaluation_interval == timedelta(minutes=5)
    assert (
        pool.target_dedicated_nodes == 2
        and "$TargetDedicatedNodes=2" in pool.auto_scale_run.results
    )
    wait_for(lambda: client.get_pool("auto").current_dedicated_nodes == 2)

    with pytest.raises(ResourceExistsError) as refused:
        client.begin_resize_pool("auto", m.BatchPoolResizeOptions(target_dedicated_nodes=1))
    assert (refused.value.status_code, refused.value.error.code) == (409, AUTOSCALE_RESIZE_CONFLICT)

    assert client.disable_pool_auto_scale("auto", cls=status) == 200
    assert not client.get_pool("auto").enable_auto_scale
    wait_for(lambda: client.get_pool("auto").allocation_state == "steady")
    one = m.BatchPoolResizeOptions(target_dedicated_nodes=1)
    client.begin_resize_pool("auto", one, polling_interval=POLL).result()
    assert client.get_pool("auto").current_dedicated_nodes == 1


def test_errors_have_batch_codes(batch: BatchEmulator) -> None:
    client = batch.client()
    client.create_pool(pool_options("dup"))
    with pytest.raises(ResourceExistsError) as exists:
        client.create_pool(pool_options("dup"))
    assert (exists.value.status_code, exists.value.error.code) == (409, "PoolExists")
    with pytest.raises(HttpResponseError) as bad_id:
        client.create_pool(pool_options("no spaces allowed"))
    assert (bad_id.value.status_code, bad_id.value.error.code) == (400, "InvalidPropertyValue")
    with pytest.raises(HttpResponseError) as no_size:
        client.create_pool(pool_options("sizeless", vm_size=None))
    assert (no_size.value.status_code, no_size.value.error.code) == (400, "MissingRequiredProperty")
    with pytest.raises(ResourceNotFoundError) as missing:
        client.begin_resize_pool("nope", m.BatchPoolResizeOptions(target_dedicated_nodes=1))
    assert missing.value.error.code == "PoolNotFound"

    intruder = type(client)(batch.url, type(batch.credential())(batch.account, "d3Jvbmc="))
    with pytest.raises(HttpResponseError) as forbidden:
        intruder.get_pool("dup")
    assert (forbidden.value.status_code, forbidden.value.error.code) == (
        403,
        "AuthenticationFailed",
    )
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(f"{batch.url}/pools?api-version={API_VERSION}")
    assert unsigned.value.code == 403

    old = batch.client(api_version="2024-07-01.20.0")
    with pytest.raises(HttpResponseError) as version:
        old.get_pool("dup")
    assert (version.value.status_code, version.value.error.code) == (
        400,
        "InvalidQueryParameterValue",
    )
