"""Inbound NAT endpoints: a pool's ``inboundNATPools``, checked as Batch checks them, and
the public frontend that forwards each node's frontend port to its backend port.

On Azure, a pool with ``networkConfiguration.endpointConfiguration.inboundNATPools`` gets a
public IP address; node ``i`` of the pool is reachable at ``frontendPortRangeStart + i``
of that address, which the load balancer forwards to the node's ``backendPort``, and only
from the sources the pool's network security group rules allow. Here the public address
is the pool's own address on the account's network (``127.a.b.c``), and a
:class:`Forwarder` per node endpoint listens on it, applies the rules to the connecting
address, and pipes bytes to the node's own address. Every connection it sees is recorded
(:attr:`Forwarder.log`), so a test can show what a client connected to. A source the
rules deny is dropped as an NSG does: the connection is held open and silent, so the
client's handshake times out.
:meth:`Forwarder.cut` drops every connection and stops listening for a while (new ones
are refused), as when a laptop's Wi-Fi goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

#: Backend ports Batch keeps for itself (ssh, RDP, its node agent).
RESERVED_BACKEND_PORTS = frozenset({22, 3389, 29876, 29877})
#: Frontend ports Batch keeps for itself.
RESERVED_FRONTEND_PORTS = range(50000, 55001)
MIN_FRONTEND_RANGE = 40
MAX_NAT_POOLS = 5
MAX_RULES = 25
RULE_PRIORITIES = range(150, 4097)


class EndpointError(ValueError):
    """A property of ``inboundNATPools`` that Batch refuses (400), with its path."""

    def __init__(self, name: str, value: Any, reason: str) -> None:
        super().__init__(f"{name}={value!r}: {reason}")
        self.name, self.value, self.reason = name, value, reason


@dataclass(frozen=True)
class Rule:
    priority: int
    allow: bool
    source: str  # a CIDR, an address, or "*"

    def matches(self, address: str) -> bool:
        if self.source in ("*", "Internet", "Any"):
            return True
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.source, strict=False)
        except ValueError:
            return False


@dataclass(frozen=True)
class NatPool:
    """One checked ``inboundNATPools`` entry."""

    name: str
    protocol: str
    backend_port: int
    frontend_start: int
    frontend_end: int
    rules: tuple[Rule, ...]

    def allows(self, address: str) -> bool:
        """Batch's rule: without rules, everyone may connect; with rules, the first that
        matches by priority decides, and what none matches is denied (Azure's default
        inbound rule)."""
        if not self.rules:
            return True
        for rule in sorted(self.rules, key=lambda r: r.priority):
            if rule.matches(address):
                return rule.allow
        return False


def nat_pools(body: dict[str, Any]) -> tuple[NatPool, ...]:
    """The pool body's NAT pools, checked; raises :class:`EndpointError` as Batch would."""
    network = body.get("networkConfiguration") or {}
    pools = (network.get("endpointConfiguration") or {}).get("inboundNATPools") or []
    prefix = "networkConfiguration.endpointConfiguration.inboundNATPools"
    if len(pools) > MAX_NAT_POOLS:
        raise EndpointError(prefix, len(pools), f"at most {MAX_NAT_POOLS} per pool")
    checked = [_nat_pool(f"{prefix}[{i}]", entry) for i, entry in enumerate(pools)]
    if sum(len(p.rules) for p in checked) > MAX_RULES:
        raise EndpointError(prefix, "rules", f"at most {MAX_RULES} rules per pool")
    for i, one in enumerate(checked):
        for other in checked[i + 1 :]:
            if one.backend_port == other.backend_port:
                raise EndpointError(prefix, one.backend_port, "backend ports must be unique")
            if (
                one.frontend_start <= other.frontend_end
                and other.frontend_start <= one.frontend_end
            ):
                raise EndpointError(prefix, one.name, "frontend port ranges overlap")
    return tuple(checked)


def _nat_pool(path: str, entry: dict[str, Any]) -> NatPool:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise EndpointError(f"{path}.name", name, "required")
    protocol = str(entry.get("protocol", "")).lower()
    if protocol not in ("tcp", "udp"):
        raise EndpointError(f"{path}.protocol", entry.get("protocol"), "tcp or udp")
    backend = entry.get("backendPort")
    if not isinstance(backend, int) or not 1 <= backend <= 65535:
        raise EndpointError(f"{path}.backendPort", backend, "between 1 and 65535")
    if backend in RESERVED_BACKEND_PORTS:
        raise EndpointError(f"{path}.backendPort", backend, "reserved by Batch")
    start, end = entry.get("frontendPortRangeStart"), entry.get("frontendPortRangeEnd")
    for key, port in (("frontendPortRangeStart", start), ("frontendPortRangeEnd", end)):
        if not isinstance(port, int) or not 1 <= port <= 65534:
            raise EndpointError(f"{path}.{key}", port, "between 1 and 65534")
    assert isinstance(start, int) and isinstance(end, int)
    if end - start + 1 < MIN_FRONTEND_RANGE:
        raise EndpointError(f"{path}.frontendPortRangeEnd", end, "a range of at least 40 ports")
    if start <= RESERVED_FRONTEND_PORTS[-1] and RESERVED_FRONTEND_PORTS[0] <= end:
        raise EndpointError(f"{path}.frontendPortRangeStart", start, "50000-55000 are reserved")
    rules = []
    for j, raw in enumerate(entry.get("networkSecurityGroupRules") or []):
        priority = raw.get("priority")
        if not isinstance(priority, int) or priority not in RULE_PRIORITIES:
            raise EndpointError(f"{path}.networkSecurityGroupRules[{j}].priority", priority, "")
        access = str(raw.get("access", "")).lower()
        if access not in ("allow", "deny"):
            raise EndpointError(f"{path}.networkSecurityGroupRules[{j}].access", access, "")
        source = raw.get("sourceAddressPrefix")
        if not isinstance(source, str) or not source:
            raise EndpointError(
                f"{path}.networkSecurityGroupRules[{j}].sourceAddressPrefix", source, "required"
            )
        rules.append(Rule(priority, access == "allow", source))
    if len({r.priority for r in rules}) != len(rules):
        raise EndpointError(f"{path}.networkSecurityGroupRules", "priority", "must be unique")
    return NatPool(name, protocol, backend, start, end, tuple(rules))


@dataclass(frozen=True)
class Connection:
    """One connection the frontend accepted or refused."""

    source: str  # the connecting address
    frontend: tuple[str, int]
    backend: tuple[str, int]
    allowed: bool
    time: float
    #: The forwarder's own end of its connection to the backend, when it made one.
    relay: tuple[str, int] | None = None


class Forwarder:
    """Forwards ``frontend`` (public address, frontend port) to a node's backend, for the
    sources ``nat`` allows. One thread moves the bytes of every connection."""

    def __init__(self, frontend: tuple[str, int], backend: tuple[str, int], nat: NatPool) -> None:
        self.frontend, self.backend, self.nat = frontend, backend, nat
        self.log: list[Connection] = []
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._listen()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._held: list[socket.socket] = []  # denied: silent until the forwarder closes
        self._cut_until = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="batch-emulator-frontend")
        self._thread.daemon = True
        self._thread.start()

    def cut(self, seconds: float) -> None:
        """Drop every forwarded connection and refuse new ones for ``seconds``."""
        with self._lock:
            self._cut_until = time.monotonic() + seconds
            # Stop listening first: a client that reconnects as soon as its connection
            # drops must be refused, not accepted into the backlog and then reset.
            self._unlisten()
            for sock in list(self._pairs):
                self._close(sock)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for sock in list(self._pairs):
                self._close(sock)
            for sock in self._held:
                sock.close()
            self._unlisten()
        self._selector.close()

    def _listen(self) -> None:
        self._listener = socket.create_server(self.frontend)  # SO_REUSEADDR: again after a cut
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._listener is None and time.monotonic() >= self._cut_until:
                    self._listen()
            for key, _ in self._selector.select(timeout=0.05):
                with self._lock:
                    if key.data is None:
                        self._accept()
                    elif key.fileobj in self._pairs:
                        self._pump(key.fileobj)  # type: ignore[arg-type]

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            client, (source, _) = self._listener.accept()
        except OSError:
            return
        allowed = self.nat.allows(source)
        seen = Connection(source, self.frontend, self.backend, allowed, time.time())
        if not allowed:
            self.log.append(seen)
            self._held.append(client)
            return
        try:
            backend = socket.create_connection(self.backend, timeout=5)
        except OSError:
            # Nothing listens behind it (the VM is gone): the load balancer's SYN goes
            # unanswered, so the client's connection stays silent, as a drop.
            self.log.append(seen)
            self._held.append(client)
            return
        self.log.append(dataclasses.replace(seen, relay=backend.getsockname()[:2]))
        for sock in (client, backend):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, "pipe")
        self._pairs[client], self._pairs[backend] = backend, client

    def _pump(self, sock: socket.socket) -> None:
        peer = self._pairs[sock]
        try:
            data = sock.recv(65536)
            if data:
                peer.setblocking(True)
                peer.sendall(data)
                peer.setblocking(False)
                return
        except OSError:
            pass
        self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        peer = self._pairs.pop(sock, None)
        for one in (sock, peer):
            if one is None:
                continue
            self._pairs.pop(one, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(one)
            one.close()
