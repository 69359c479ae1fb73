"""Simulated slots: Dask workers that run no user code, so that a pool of 16,000 slots fits
on two cores and its scheduler, client and engine can be measured at that size.

A simulated slot speaks the part of Dask's worker protocol that a cloudmap pool uses, and
nothing else: it registers with the scheduler (``register-worker``), keeps a batched stream
open on which it receives ``compute-task``, ``free-keys``, ``cancel-compute`` and
``worker-status-change`` and sends ``task-finished``, cloudmap's start event and its status
confirmations, answers ``get_data`` on a listener of its own (the client fetches results
straight from slots), and heartbeats at the interval the scheduler asks for. It runs one task
at a time, as a one-thread cloudmap slot does, and "runs" it for the time the batch declares:
the mapped function must be a :class:`DeclaredWork`, whose items each take
``seconds_per_item``; the task's result is a real cloudmap result (the items themselves as
values), so the engine unpacks and orders it as any other.

What is left out, on purpose: dependencies between tasks (cloudmap tasks have none), work
stealing (cloudmap turns it off), spilling, plugins, ``client.run`` (MPI). A task whose
function is not a DeclaredWork fails with an error that says so.

Many slots share one process, a *host*: ``python -m cloudmap.testing.simulated_slots``
starts one (see :func:`main`), and :class:`~cloudmap.testing.simulated_provider.
SimulatedProvider` starts hosts as a pool's provider. A host answers ``stats`` on its
standard input with one JSON line: for every task it ran, when it started and stopped, and
for every slot its first start and last stop; ``reset`` forgets them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from distributed.batched import BatchedSend
from distributed.comm import Comm, CommClosedError, connect, listen
from distributed.core import rpc
from distributed.protocol import to_serialize
from distributed.versions import get_versions

from ..node.runner import load_function
from ..nodes import slot_name
from ..payload import STARTED_TOPIC, BatchResult, RemoteError, dump_result, load_batch

#: How long a simulated slot's stream gathers messages before it writes them (a real
#: slot's is cloudmap's BATCH_INTERVAL, 1 ms; a little more here spares the host's CPU).
STREAM_INTERVAL = "2ms"
#: Slots of one host that may be registering with the scheduler at once.
REGISTERING_AT_ONCE = 32


@dataclass(frozen=True)
class DeclaredWork:
    """The function to map on simulated slots: each item takes ``seconds_per_item``.

    On a real pool it sleeps that long and returns the item, so the same map runs on both.
    """

    seconds_per_item: float

    def __call__(self, item: Any) -> Any:
        time.sleep(self.seconds_per_item)
        return item

    def seconds(self, items: Sequence[Any]) -> float:
        return self.seconds_per_item * len(items)


@dataclass
class _Task:
    key: str
    run_id: int
    fn_blob: bytes
    batch_blob: bytes
    cancelled: bool = False


class SimulatedSlot:
    """One simulated Dask worker with one thread (see the module's docstring)."""

    def __init__(self, host: SimulatedHost, name: str, ip: str) -> None:
        self.host = host
        self.name = name
        self.ip = ip
        self.address = ""
        self.status = "running"
        self.queue: deque[_Task] = deque()
        self.running: _Task | None = None
        self.data: dict[str, bytes] = {}
        self._stream = BatchedSend(interval=STREAM_INTERVAL)
        self._listener: Any = None
        self._comm: Comm | None = None
        self._reader: asyncio.Task[None] | None = None
        self.closed = False
        #: When this slot began its first task and ended its last (wall clock), or None.
        self.first_start: float | None = None
        self.last_stop: float | None = None

    async def start(self, scheduler: str) -> None:
        self._listener = listen(f"tcp://{self.ip}:0", self._serve, deserialize=True)
        await self._listener.start()
        self.address = self._listener.contact_address
        comm = await connect(scheduler)
        await comm.write(self.host.registration(self), serializers=["msgpack"])
        response = await comm.read(deserializers=["msgpack"])
        if response.get("status") != "OK":
            await comm.close()
            raise RuntimeError(f"the scheduler refused {self.name}: {response!r}")
        self._comm = comm
        self._stream.start(comm)
        self._reader = asyncio.create_task(self._read(comm))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        if self._comm is not None:
            with contextlib.suppress(Exception):
                await self._stream.close(timeout=1)
        if self._listener is not None:
            self._listener.stop()

    # -- the stream from the scheduler ------------------------------------------------

    async def _read(self, comm: Comm) -> None:
        try:
            while not self.closed:
                messages = await comm.read()
                for message in messages if isinstance(messages, (list, tuple)) else [messages]:
                    self._handle(message)
        except (CommClosedError, OSError):
            pass
        finally:
            await self.close()

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "compute-task":
            run_spec = message["run_spec"]
            fn_blob, batch_blob = run_spec.args[:2]
            self.queue.append(_Task(message["key"], message["run_id"], fn_blob, batch_blob))
            self._start_next()
        elif op in ("free-keys", "cancel-compute"):
            keys = message["keys"] if op == "free-keys" else [message["key"]]
            self._forget(keys)
        elif op == "worker-status-change":
            self.status = message["status"]
            self._send("worker-status-change", status=self.status)
            self._start_next()
        elif op in ("close", "remove-worker"):
            asyncio.get_running_loop().create_task(self.close())

    def _forget(self, keys: Iterable[str]) -> None:
        gone = set(keys)
        for key in gone:
            self.data.pop(key, None)
        self.queue = deque(task for task in self.queue if task.key not in gone)
        if self.running is not None and self.running.key in gone:
            self.running.cancelled = True  # it ends unheard, as a cancelled Dask task does

    def _send(self, op: str, **fields: Any) -> None:
        if not self.closed:
            self._stream.send({"op": op, "stimulus_id": f"{op}-{time.time()}", **fields})

    def _log_event(self, topic: str, message: dict[str, Any]) -> None:
        if not self.closed:
            self._stream.send({"op": "log-event", "topic": topic, "msg": message})

    # -- running ------------------------------------------------------------------------

    def _start_next(self) -> None:
        if self.running is not None or not self.queue or self.status != "running":
            return
        task = self.running = self.queue.popleft()
        self._log_event(
            STARTED_TOPIC, {"key": task.key, "worker": self.address, "run_id": task.run_id}
        )
        started = time.time()
        if self.first_start is None:
            self.first_start = started
        result, seconds = self.host.outcome(self.name, task)
        asyncio.get_running_loop().call_later(seconds, self._finish, task, started, result)

    def _finish(self, task: _Task, started: float, result: bytes) -> None:
        stopped = self.last_stop = time.time()
        self.running = None
        self.host.record(started, stopped)
        if not task.cancelled and not self.closed:
            self.data[task.key] = result
            self._send(
                "task-finished",
                status="OK",
                key=task.key,
                run_id=task.run_id,
                nbytes=len(result),
                type=pickle.dumps(bytes),
                typename="bytes",
                metadata={},
                thread=None,
                startstops=[{"action": "compute", "start": started, "stop": stopped}],
            )
        self._start_next()

    # -- results, to whoever asks -------------------------------------------------------

    async def _serve(self, comm: Comm) -> None:
        try:
            while True:
                message = await comm.read()
                op = message.get("op") if isinstance(message, dict) else None
                if op == "get_data":
                    found = {
                        k: to_serialize(self.data[k]) for k in message["keys"] if k in self.data
                    }
                    await comm.write({"status": "OK", "data": found})
                    await comm.read()  # the peer's "OK": the data arrived
                elif op == "close" or op is None:
                    break
                elif message.get("reply", True):
                    await comm.write({"status": "error", "message": f"simulated slot: {op}?"})
        except (CommClosedError, OSError):
            pass
        finally:
            comm.abort()


class SimulatedHost:
    """The slots of several simulated nodes, in this process, on one event loop."""

    def __init__(self, scheduler: str, nodes: dict[str, str], slots_per_node: int) -> None:
        """``nodes``: node id -> the loopback address its slots listen on (one per node, as
        a machine has its own: 16,000 listeners on one address would use up its ports)."""
        self.scheduler = scheduler
        self.slots = {
            slot_name(node, i): SimulatedSlot(self, slot_name(node, i), ip)
            for node, ip in nodes.items()
            for i in range(slots_per_node)
        }
        self.nodes = {node: [slot_name(node, i) for i in range(slots_per_node)] for node in nodes}
        self.intervals: list[tuple[float, float]] = []
        self._versions = get_versions()
        self._server_id = uuid.uuid4().hex
        self.heartbeat_interval = 0.5

    def registration(self, slot: SimulatedSlot) -> dict[str, Any]:
        return {
            "op": "register-worker",
            "reply": False,
            "address": slot.address,
            "status": "running",
            "nthreads": 1,
            "name": slot.name,
            "now": time.time(),
            "resources": {},
            "memory_limit": 0,
            "local_directory": "/nonexistent",
            "services": {},
            "nanny": None,
            "pid": os.getpid(),
            "versions": self._versions,
            "metrics": _metrics(),
            "extra": {},
            "stimulus_id": f"worker-connect-{time.time()}",
            "server_id": f"{self._server_id}-{slot.name}",
        }

    def outcome(self, slot: str, task: _Task) -> tuple[bytes, float]:
        """The result blob of a task and how long it "runs"."""
        batch = load_batch(task.batch_blob)
        work = load_function(task.fn_blob)
        if not isinstance(work, DeclaredWork):
            error = RemoteError.from_exception(
                TypeError(
                    "simulated slots run only cloudmap.testing.simulated_slots.DeclaredWork, "
                    f"not {type(work).__name__}"
                )
            )
            errors = dict.fromkeys(range(len(batch.items)), error)
            result = BatchResult(slot, 0.0, [None] * len(batch.items), errors, len(batch.items))
            return dump_result(result), 0.0
        seconds = work.seconds(batch.items)
        result = BatchResult(slot, seconds, list(batch.items), {}, len(batch.items))
        return dump_result(result), seconds

    def record(self, started: float, stopped: float) -> None:
        self.intervals.append((started, stopped))

    async def start(self) -> None:
        gate = asyncio.Semaphore(REGISTERING_AT_ONCE)

        async def register(slot: SimulatedSlot) -> None:
            async with gate:
                await slot.start(self.scheduler)

        await asyncio.gather(*(register(slot) for slot in self.slots.values()))

    async def heartbeat(self) -> None:
        """Heartbeat every slot once per the interval the scheduler asks for (as Dask
        workers do: with many workers the scheduler asks for fewer per second)."""
        scheduler = rpc(self.scheduler)
        try:
            while True:
                slots = [s for s in self.slots.values() if not s.closed]
                pause = self.heartbeat_interval / max(1, len(slots))
                for slot in slots:
                    if slot.closed:
                        continue
                    reply = await scheduler.heartbeat_worker(
                        address=slot.address, now=time.time(), metrics=_metrics()
                    )
                    if isinstance(reply, dict) and "heartbeat-interval" in reply:
                        self.heartbeat_interval = float(reply["heartbeat-interval"])
                    await asyncio.sleep(pause)
                if not slots:
                    await asyncio.sleep(0.5)
        finally:
            await scheduler.close_rpc()

    async def remove(self, node: str) -> None:
        for name in self.nodes.pop(node, []):
            slot = self.slots.pop(name, None)
            if slot is not None:
                await slot.close()

    def stats(self) -> dict[str, Any]:
        """Every task's (start, stop), every slot's first start and last stop (None: no
        work yet)."""
        return {
            "intervals": self.intervals,
            "first_starts": [slot.first_start for slot in self.slots.values()],
            "last_stops": [slot.last_stop for slot in self.slots.values()],
        }

    def reset(self) -> dict[str, Any]:
        """Forget what the slots did so far (a benchmark's next map starts afresh)."""
        self.intervals = []
        for slot in self.slots.values():
            slot.first_start = slot.last_stop = None
        return {"reset": len(self.slots)}

    async def close(self) -> None:
        await asyncio.gather(*(slot.close() for slot in self.slots.values()))


def _metrics() -> dict[str, Any]:
    """What a heartbeat reports: an idle, empty worker (the scheduler reads these keys)."""
    return {
        "task_counts": {},
        "bandwidth": {"total": 100_000_000, "workers": {}, "types": {}},
        "digests_total_since_heartbeat": {},
        "managed_bytes": 0,
        "spilled_bytes": {"memory": 0, "disk": 0},
        "transfer": {
            "incoming_bytes": 0,
            "incoming_count": 0,
            "incoming_count_total": 0,
            "outgoing_bytes": 0,
            "outgoing_count": 0,
            "outgoing_count_total": 0,
        },
        "event_loop_interval": 0.02,
        "cpu": 0.0,
        "memory": 0,
        "time": time.time(),
        "read_bytes": 0.0,
        "write_bytes": 0.0,
        "num_fds": 0,
    }


async def _serve_commands(host: SimulatedHost) -> None:
    """Answer the parent on standard input until it closes: ``stats``, ``reset``,
    ``remove NODE``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        command, _, argument = line.partition(" ")
        if command == "stats":
            print(json.dumps(host.stats()), flush=True)
        elif command == "reset":
            print(json.dumps(host.reset()), flush=True)
        elif command == "remove":
            await host.remove(argument)
            print(json.dumps({"removed": argument}), flush=True)


async def _run(scheduler: str, nodes: dict[str, str], slots_per_node: int) -> None:
    host = SimulatedHost(scheduler, nodes, slots_per_node)
    await host.start()
    print(json.dumps({"ready": len(host.slots)}), flush=True)
    beats = asyncio.create_task(host.heartbeat())
    try:
        await _serve_commands(host)
    finally:
        beats.cancel()
        await host.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m cloudmap.testing.simulated_slots SCHEDULER SLOTS_PER_NODE NODE@IP...``:
    register the nodes' slots, print ``{"ready": n}``, then serve until stdin closes."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("scheduler")
    parser.add_argument("slots_per_node", type=int)
    parser.add_argument("nodes", nargs="+", help="node-id@loopback-address")
    args = parser.parse_args(argv)
    nodes = dict(node.split("@", 1) for node in args.nodes)
    asyncio.run(_run(args.scheduler, nodes, args.slots_per_node))


if __name__ == "__main__":
    # Run the module under its own name, so that the DeclaredWork the tasks unpickle is the
    # class the host checks for (this file's classes here are __main__'s).
    from cloudmap.testing.simulated_slots import main as run_host

    run_host()
