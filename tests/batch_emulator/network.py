"""The emulated account's network: every node on a loopback address of its own.

Linux routes all of 127.0.0.0/8 to the loopback interface, so a process can listen on
127.a.b.c without any set-up. Each emulator takes a random /24 of its own (127.a.b.0) and
hands out ``.2``, ``.3``, ... in order: to each node (its private address) and to each
pool (its public address, where its inbound NAT endpoints listen). Two test sessions on
one machine thus use different addresses and never listen on the same ones. Nothing
outside 127.0.0.0/8 is touched.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from dataclasses import dataclass, field


@dataclass
class LoopbackNetwork:
    """Addresses within ``127.<a>.<b>.0/24``; beyond 253 they go on in the next /24."""

    a: int
    b: int
    _next: itertools.count[int] = field(default_factory=lambda: itertools.count(2))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def random(cls) -> LoopbackNetwork:
        # 127.0.x.x holds 127.0.0.1, where the emulator's HTTP server and the client live.
        return cls(a=1 + secrets.randbelow(254), b=secrets.randbelow(250))

    def next_address(self) -> str:
        with self._lock:
            index = next(self._next)
        block, host = divmod(index - 2, 253)
        return f"127.{self.a}.{(self.b + block) % 256}.{host + 2}"
