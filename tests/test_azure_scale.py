"""Azure at 1,000 nodes: what a pool costs Batch per interval, and how it takes Batch's
pushing back (429 with Retry-After, 503), against the emulator with 1,000 node records.

The node records run no process (``BatchEmulator.add_fake_nodes``): the pool lists them,
shows them and removes them as it would VMs, but no slot ever joins, so they stay
``starting`` in ``pool.nodes()``. Every count below is read from the emulator's request log.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.batch import models
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest

import cloudmap
from cloudmap.providers.azure.removals import MAX_REMOVALS
from cloudmap.providers.azure.settings import AzureSettings

from .batch_emulator import API_VERSION, BatchEmulator, Request, running_batch_emulator
from .conftest import eventually

pytestmark = pytest.mark.usefixtures("scheduler_in_the_client")

NODES = 1000
#: Seconds between listings (the provider's default).
INTERVAL = 0.25
THROTTLING_LOGGER = "cloudmap.providers.azure.throttling"


@pytest.fixture(params=[1000, 250], ids=["page1000", "page250"])
def batch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BatchEmulator]:
    with running_batch_emulator(
        tmp_path / "batch", node_start_delay=0.05, page_size=request.param
    ) as emu:
        yield emu


@pytest.fixture
def big_pool(batch: BatchEmulator) -> Iterator[tuple[cloudmap.Pool, str]]:
    """A pool (no node of its own) whose Batch pool holds 1,000 idle node records."""
    pool = cloudmap.Pool(
        "azure",
        nodes=0,
        account_url=batch.url,
        credential=batch.credential(),
        python=sys.executable,
        vm_size="Standard_D2s_v5",
        list_interval=INTERVAL,
        backoff=0.05,
        backoff_max=0.5,
    )
    try:
        pool_id = pool.provider.pool_id  # type: ignore[union-attr]
        batch.add_fake_nodes(pool_id, NODES)
        assert eventually(lambda: len(pool.nodes()) == NODES, 30)
        yield pool, pool_id
    finally:
        pool.close()


def page_count(batch: BatchEmulator) -> int:
    return math.ceil(NODES / batch._server.page_size)


def listings(requests: list[Request]) -> list[list[Request]]:
    """The node listings in a request log: each starts with a request without $skiptoken
    and goes on with the pages its nextLinks named (the provider lists one at a time)."""
    found: list[list[Request]] = []
    for r in requests:
        if r.operation != "list_nodes" or r.refused:
            continue
        if "skiptoken" not in r.path or not found:
            found.append([])
        found[-1].append(r)
    return found


def keep_asking(pool: cloudmap.Pool, seconds: float) -> list[tuple[float, int]]:
    """Ask for the pool's nodes every 50 ms, as waits and a live widget do; returns how
    long each answer took and how many nodes it had."""
    answers = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        count = len(pool.nodes())
        answers.append((time.monotonic() - start, count))
        time.sleep(0.05)
    return answers


def test_a_poll_of_1000_nodes_is_one_paged_listing_and_no_request_per_node(
    big_pool: tuple[cloudmap.Pool, str], batch: BatchEmulator
) -> None:
    pool, _ = big_pool
    nodes = pool.nodes()
    assert len({n.id for n in nodes}) == NODES
    assert all(n.dedicated and n.state == cloudmap.NodeState.STARTING for n in nodes)

    batch.clear_requests()
    seconds = 8 * INTERVAL
    answers = keep_asking(pool, seconds)
    log = batch.requests()

    assert all(count == NODES for _, count in answers)
    assert set(r.operation for r in log) == {"list_nodes"}  # no get_node, no file, no pool
    found = listings(log)
    pages = page_count(batch)
    assert [len(listing) for listing in found] == [pages] * len(found)
    # One listing per interval at most, whoever asks (here every 50 ms, and the scaler).
    assert 2 <= len(found) <= seconds / INTERVAL + 1
    # Only the properties cloudmap reads, 1000 a page (Batch's largest).
    first = found[0][0].path
    assert "maxresults=1000" in first and "select=" in first.replace("%24", "$")


@pytest.mark.parametrize("batch", [250], indirect=True, ids=["page250"])
def test_a_429_with_retry_after_is_waited_out_and_the_pool_goes_on(
    big_pool: tuple[cloudmap.Pool, str],
    batch: BatchEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool, _ = big_pool
    caplog.set_level(logging.INFO, logger=THROTTLING_LOGGER)
    batch.clear_requests()
    batch.refuse_next("list_nodes", 2, status=429, retry_after=1)

    answers = keep_asking(pool, 3.5)

    log = batch.requests("list_nodes")
    refused = [i for i, r in enumerate(log) if r.refused]
    assert [log[i].refused for i in refused] == [429, 429]
    for i in refused:  # the next request came once Retry-After had passed
        assert log[i + 1].time - log[i].time >= 0.95
    assert not log[-1].refused
    # Meanwhile the pool answered with what Batch last said: at once, but for the one call
    # (if the scaler's thread did not) that was listing and waited out the Retry-Afters.
    assert all(count == NODES for _, count in answers)
    slow = [took for took, _ in answers if took > 0.5]
    assert len(slow) <= 1 and max(slow, default=0) < 3.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "429 with Retry-After: 1" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("batch", [250], indirect=True, ids=["page250"])
def test_a_burst_of_503s_is_backed_off_exponentially_and_survived(
    big_pool: tuple[cloudmap.Pool, str],
    batch: BatchEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool, _ = big_pool
    caplog.set_level(logging.WARNING, logger=THROTTLING_LOGGER)
    batch.clear_requests()
    batch.refuse_next("list_nodes", 4, status=503, retry_after=None)

    answers = keep_asking(pool, 2.0)

    log = batch.requests("list_nodes")
    first = next(i for i, r in enumerate(log) if r.refused)
    burst = log[first : first + 5]
    assert [r.refused for r in burst] == [503, 503, 503, 503, None]
    gaps = [b.time - a.time for a, b in itertools.pairwise(burst)]
    for attempt, gap in enumerate(gaps, start=1):  # 0.05 s doubling, jittered to [50%, 100%]
        assert gap >= 0.5 * 0.05 * 2 ** (attempt - 1) - 0.005, gaps
    assert gaps[-1] > gaps[0]
    assert all(count == NODES for _, count in answers)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("batch", [250], indirect=True, ids=["page250"])
def test_an_outage_longer_than_the_retries_and_a_rate_limit_do_not_fail_the_pool(
    big_pool: tuple[cloudmap.Pool, str],
    batch: BatchEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool, _ = big_pool
    caplog.set_level(logging.WARNING, logger=THROTTLING_LOGGER)
    # 20 refusals: more than a request's 6 retries, so whole polls fail, one after another.
    batch.clear_requests()
    batch.refuse_next("list_nodes", 20, status=503, retry_after=None)

    def recovered() -> bool:
        log = batch.requests("list_nodes")
        return sum(1 for r in log if r.refused) == 20 and not log[-1].refused

    answers = []
    deadline = time.monotonic() + 30
    while not recovered() and time.monotonic() < deadline:
        answers += keep_asking(pool, 0.5)
    assert recovered()
    assert all(count == NODES for _, count in answers)  # what Batch said last
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    # Under load: Batch refuses what comes beyond 2 requests a second.
    batch.limit_rate(2)
    try:
        answers = keep_asking(pool, 2.0)
    finally:
        batch.limit_rate(None)
    assert all(count == NODES for _, count in answers)
    assert any(r.refused == 503 for r in batch.requests("list_nodes"))
    assert eventually(lambda: not batch.requests("list_nodes")[-1].refused, 10)


def test_removing_250_nodes_goes_100_ids_a_request_each_once_the_pool_is_steady(
    big_pool: tuple[cloudmap.Pool, str], batch: BatchEmulator
) -> None:
    pool, pool_id = big_pool
    client = batch.client()
    batch.clear_requests()

    pool.resize(NODES - 250)

    assert len(pool.nodes()) == NODES - 250  # at once, for the pool
    assert eventually(lambda: len(batch.requests("remove_nodes")) == 3, 30)
    sent = [r.json()["nodeList"] for r in batch.requests("remove_nodes")]
    assert [len(ids) for ids in sent] == [MAX_REMOVALS, MAX_REMOVALS, 50]
    assert len({i for ids in sent for i in ids}) == 250
    # Each went to a steady pool: no 409, so no resize had to be stopped.
    assert batch.request_counts()["stop_pool_resize"] == 0
    assert eventually(lambda: len(list(client.list_nodes(pool_id))) == NODES - 250, 30)
    assert client.get_pool(pool_id).target_dedicated_nodes == NODES - 250
    assert len(pool.nodes()) == NODES - 250


@pytest.mark.parametrize("batch", [1000], indirect=True, ids=["page1000"])
def test_a_throttled_removal_is_sent_again(
    big_pool: tuple[cloudmap.Pool, str], batch: BatchEmulator
) -> None:
    pool, pool_id = big_pool
    batch.clear_requests()
    # More 503s than a request's retries: the provider sends that chunk again later.
    batch.refuse_next("remove_nodes", 10, status=503, retry_after=None)

    pool.resize(NODES - 150)

    assert eventually(lambda: batch.request_counts()["remove_nodes"] >= 12, 30)
    answered = [r.json()["nodeList"] for r in batch.requests("remove_nodes") if not r.refused]
    assert sorted(len(ids) for ids in answered) == [50, MAX_REMOVALS]
    client = batch.client()
    assert eventually(lambda: len(list(client.list_nodes(pool_id))) == NODES - 150, 30)


@pytest.mark.parametrize("batch", [1000], indirect=True, ids=["page1000"])
def test_the_emulator_pages_and_pushes_back_as_batch_does(batch: BatchEmulator) -> None:
    client = batch.client(retry_total=0)  # the raw answers
    client.create_pool(
        models.BatchPoolCreateOptions(
            id="raw",
            vm_size="Standard_D2s_v5",
            virtual_machine_configuration=models.VirtualMachineConfiguration(
                image_reference=models.BatchVmImageReference(
                    publisher="canonical", offer="ubuntu-24_04-lts", sku="server"
                ),
                node_agent_sku_id="batch.node.ubuntu 24.04",
            ),
        )
    )
    batch.add_fake_nodes("raw", 2500)
    nodes = f"/pools/raw/nodes?api-version={API_VERSION}"

    def get(url: str) -> Any:
        """The answer, or Batch's refusal as the SDK raises it (its ``response``)."""
        try:
            return client.send_request(HttpRequest("GET", url))
        except HttpResponseError as exc:
            return exc.response

    first = get(nodes).json()  # no maxresults: Batch's default of 1000
    assert len(first["value"]) == 1000 and first["odata.nextLink"].startswith(batch.url)
    assert [len(list(page)) for page in client.list_nodes("raw").by_page()] == [1000, 1000, 500]
    assert client.get_pool("raw").target_dedicated_nodes == 2500
    too_many = get(nodes + "&maxresults=1001")
    assert too_many.status_code == 400 and too_many.json()["code"] == "InvalidQueryParameterValue"

    batch.refuse_next("list_nodes", 1, status=429, retry_after=7)
    throttled = get(nodes)
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "7")
    assert throttled.json()["code"] == "TooManyRequests"
    batch.refuse_next("get_pool", 1, status=503, retry_after=None)
    busy = get(f"/pools/raw?api-version={API_VERSION}")
    assert busy.status_code == 503 and "Retry-After" not in busy.headers
    assert busy.json()["code"] == "ServerBusy"
    assert get(nodes).status_code == 200  # the plan is spent

    batch.limit_rate(1)
    assert [get(nodes).status_code for _ in range(3)] == [200, 503, 503]
    batch.limit_rate(None)
    assert [r.refused for r in batch.requests("list_nodes")][-4:] == [None, None, 503, 503]
    with pytest.raises(ValueError, match="list_nodes"):
        batch.refuse_next("list_node", 1)
    with pytest.raises(ValueError, match="state="):
        batch.add_fake_nodes("raw", 1, state="asleep")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"list_interval": 0}, "list_interval"),
        ({"backoff": -1}, "backoff"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
    ],
)
def test_bad_throttling_settings_say_what_to_pass(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(cloudmap.InputError, match=message):
        AzureSettings.resolve(**bad)
