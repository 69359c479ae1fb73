"""A provider whose nodes are simulated slots (:mod:`cloudmap.testing.simulated_slots`).

``Pool("simulated", nodes=1000, slots_per_node=16)`` is a real pool, with its real scheduler,
client, engine, scaling loop and widgets, whose 16,000 slots run no code: each task "runs"
for the time its :class:`~cloudmap.testing.simulated_slots.DeclaredWork` declares. It exists
to measure cloudmap at sizes this machine cannot run (``benchmarks/scale.py``).

Slots are spread over host processes of at most ``slots_per_host`` slots each (a process may
hold 20,000 open files here, and each slot holds two sockets).
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

from ..errors import InputError
from ..nodes import ProviderNode
from ..providers.base import PoolSpec, Provider

#: Slots per host process by default: about 8,000 open sockets per process.
SLOTS_PER_HOST = 4000


@dataclass
class SlotActivity:
    """(start, stop) of every task the slots ran, and each slot's first start and last
    stop (None for a slot that has run nothing)."""

    intervals: list[tuple[float, float]]
    first_starts: list[float | None]
    last_stops: list[float | None]


@dataclass
class _Host:
    process: subprocess.Popen[str]
    nodes: dict[str, bool]  # node id -> dedicated
    ready: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ask(self, command: str) -> dict[str, Any]:
        """Send one command line and read the host's one-line JSON answer."""
        with self.lock:
            stdin, stdout = self._pipes()
            stdin.write(command + "\n")
            stdin.flush()
            return dict(json.loads(stdout.readline()))

    def wait_ready(self) -> None:
        with self.lock:
            if not self.ready:
                _, stdout = self._pipes()
                line = stdout.readline()
                if not line:
                    raise RuntimeError("a simulated host ended before its slots registered")
                self.ready = True

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        return self.process.stdin, self.process.stdout


class SimulatedProvider(Provider):
    """Nodes whose slots are simulated (see the module's docstring); no start task, no
    spot preemption, no files."""

    name = "simulated"
    option_names = ("slots_per_host",)

    def __init__(self, spec: PoolSpec, *, slots_per_host: int = SLOTS_PER_HOST, **options: Any):
        super().__init__(spec, **options)
        if spec.start_task is not None or spec.packages or spec.resource_files:
            raise InputError("simulated nodes run no start task, packages or resource files")
        if slots_per_host < spec.slots_per_node:
            raise InputError(f"slots_per_host={slots_per_host} holds not even one node")
        self._nodes_per_host = slots_per_host // spec.slots_per_node
        # A random 127.N.0.0/16 per pool, so that two test sessions' nodes do not meet.
        self._octet = random.randrange(64, 250)
        self._hosts: list[_Host] = []
        self._since: dict[str, datetime] = {}
        self._numbers = itertools.count()
        self._scheduler: str | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "simulated slots (no code runs)"

    def start(self, scheduler_address: str | None) -> None:
        self._scheduler = scheduler_address
        self.add_nodes(self.spec.nodes)
        self.add_nodes(self.spec.spot_nodes, dedicated=False)

    def add_nodes(self, count: int, *, dedicated: bool = True) -> list[str]:
        if self._scheduler is None:
            raise RuntimeError("start() the provider before adding nodes")
        numbers = [next(self._numbers) for _ in range(count)]
        ids = [f"node-{number}" for number in numbers]
        for first in range(0, len(ids), self._nodes_per_host):
            nodes = ids[first : first + self._nodes_per_host]
            addresses = [self._address(number) for number in numbers[first : first + len(nodes)]]
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cloudmap.testing.simulated_slots",
                    self._scheduler,
                    str(self.spec.slots_per_node),
                    *(f"{node}@{ip}" for node, ip in zip(nodes, addresses, strict=True)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            with self._lock:
                self._hosts.append(_Host(process, dict.fromkeys(nodes, dedicated)))
                now = datetime.now(timezone.utc)
                self._since.update(dict.fromkeys(nodes, now))
        return ids

    def _address(self, number: int) -> str:
        """Node ``number``'s own loopback address, in this pool's 127.N.0.0/16."""
        if number >= 250 * 250:
            raise InputError("simulated pools hold at most 62,500 nodes")
        return f"127.{self._octet}.{number // 250}.{number % 250 + 1}"

    def wait_registered(self, timeout: float = 600) -> None:
        """Block until every host has registered all its slots (they print one line)."""
        deadline = time.monotonic() + timeout
        for host in list(self._hosts):
            host.wait_ready()
            if time.monotonic() > deadline:
                raise TimeoutError("simulated slots took too long to register")

    def list_nodes(self) -> list[ProviderNode]:
        with self._lock:
            hosts = list(self._hosts)
        return [
            ProviderNode(
                id=node,
                state="ready" if host.process.poll() is None else "unusable",
                dedicated=dedicated,
                slots=self.spec.slots_per_node,
                since=self._since[node],
            )
            for host in hosts
            for node, dedicated in host.nodes.items()
        ]

    def remove_nodes(self, node_ids: Sequence[str]) -> None:
        for node in node_ids:
            self.events.lost(node)
            for host in list(self._hosts):
                if node in host.nodes:
                    host.wait_ready()
                    host.ask(f"remove {node}")
                    del host.nodes[node]

    def activity(self) -> SlotActivity:
        """What the slots have done so far, from every host (wall-clock times)."""
        activity = SlotActivity([], [], [])
        for host in list(self._hosts):
            if host.process.poll() is None:
                host.wait_ready()
                stats = host.ask("stats")
                activity.intervals.extend((start, stop) for start, stop in stats["intervals"])
                activity.first_starts.extend(stats["first_starts"])
                activity.last_stops.extend(stats["last_stops"])
        return activity

    def reset_activity(self) -> None:
        """Forget what the slots have done, so that :meth:`activity` covers what follows."""
        for host in list(self._hosts):
            if host.process.poll() is None:
                host.wait_ready()
                host.ask("reset")

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = self._hosts, []
        for host in hosts:
            with host.lock:
                if host.process.stdin is not None:
                    host.process.stdin.close()
        for host in hosts:
            try:
                host.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                host.process.kill()
                host.process.wait()
            if host.process.stdout is not None:
                host.process.stdout.close()
