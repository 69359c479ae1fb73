"""The emulator's request log and its refusals: throttling (429) and overload (503).

Every authenticated request is named by its operation (``list_nodes``, ``get_pool``,
``remove_nodes``, ... as the SDK's methods are named) and logged, answered or refused, so a
test can count what a client cost. A test makes Batch push back in two ways:

- :meth:`Traffic.refuse_next`: the next ``count`` requests of one operation are refused with
  429 ``TooManyRequests`` and a ``Retry-After`` header, or 503 ``ServerBusy``, as Batch
  answers a client it throttles or a front end that is overloaded;
- :meth:`Traffic.limit_rate`: "under load", any request beyond ``per_second`` within the last
  second is refused (503 by default), however many came before.

A refused request changes nothing in the account.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from .state import BatchError

#: Batch's words for the two refusals (codes as in BatchErrorCodeStrings).
THROTTLED = ("TooManyRequests", "The server is throttling this client; retry after a while.")
BUSY = ("ServerBusy", "The server is currently unable to receive requests. Please retry.")


#: Every operation name :func:`operation` gives.
OPERATIONS = frozenset(
    {
        "create_pool",
        "list_pools",
        "get_pool",
        "pool_exists",
        "delete_pool",
        "update_pool",
        "resize_pool",
        "stop_pool_resize",
        "remove_nodes",
        "enable_pool_auto_scale",
        "disable_pool_auto_scale",
        "evaluate_pool_auto_scale",
        "replace_pool_properties",
        "list_nodes",
        "get_node",
        "list_node_files",
        "get_node_file",
        "other",
    }
)


def operation(method: str, segments: list[str]) -> str:
    """The operation a request is for, named as the SDK's method (``other`` if unknown)."""
    if not segments or segments[0] != "pools":
        return "other"
    n = len(segments)
    if n == 1:
        return {"POST": "create_pool", "GET": "list_pools"}.get(method, "other")
    if n == 2:
        return {
            "GET": "get_pool",
            "HEAD": "pool_exists",
            "DELETE": "delete_pool",
            "PATCH": "update_pool",
        }.get(method, "other")
    if n == 3 and method == "POST":
        return {
            "resize": "resize_pool",
            "stopresize": "stop_pool_resize",
            "removenodes": "remove_nodes",
            "enableautoscale": "enable_pool_auto_scale",
            "disableautoscale": "disable_pool_auto_scale",
            "evaluateautoscale": "evaluate_pool_auto_scale",
            "updateproperties": "replace_pool_properties",
        }.get(segments[2], "other")
    if n == 3 and segments[2] == "nodes":
        return "list_nodes"
    if n == 4 and segments[2] == "nodes":
        return "get_node"
    if n == 5 and segments[4] == "files":
        return "list_node_files"
    if n > 5 and segments[4] == "files":
        return "get_node_file"
    return "other"


@dataclass(frozen=True)
class Request:
    """One request as the emulator saw it: when, which operation, and whether it was refused
    (``refused`` is the status it was refused with, else None)."""

    time: float
    operation: str
    method: str
    path: str
    refused: int | None
    body: bytes = b""

    def json(self) -> Any:
        """The request's JSON body (None without one)."""
        return json.loads(self.body) if self.body else None


@dataclass
class _Plan:
    status: int
    left: int
    retry_after: float | None


class Traffic:
    """The request log and the refusals planned by a test; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: list[Request] = []
        self._plans: dict[str, deque[_Plan]] = {}
        self._per_second: float = math.inf
        self._load_status = 503
        self._load_retry_after: float | None = None
        self._recent: deque[float] = deque()

    def refuse_next(
        self, op: str, count: int, *, status: int = 429, retry_after: float | None = 1
    ) -> None:
        if status not in (429, 503):
            raise ValueError(f"status={status}: the emulator refuses with 429 or 503")
        if op not in OPERATIONS:
            raise ValueError(f"operation {op!r} is not one of {', '.join(sorted(OPERATIONS))}")
        if count < 1:
            raise ValueError(f"count={count}: refuse at least one request")
        with self._lock:
            self._plans.setdefault(op, deque()).append(_Plan(status, count, retry_after))

    def limit_rate(
        self, per_second: float | None, *, status: int = 503, retry_after: float | None = None
    ) -> None:
        if status not in (429, 503):
            raise ValueError(f"status={status}: the emulator refuses with 429 or 503")
        with self._lock:
            self._per_second = math.inf if per_second is None else float(per_second)
            self._load_status, self._load_retry_after = status, retry_after
            self._recent.clear()

    def admit(self, op: str, method: str, path: str, body: bytes = b"") -> None:
        """Log the request; raise the refusal planned for it, if any."""
        now = time.monotonic()
        refusal: tuple[int, float | None] | None = None
        with self._lock:
            while self._recent and self._recent[0] <= now - 1.0:
                self._recent.popleft()
            plans = self._plans.get(op)
            if plans:
                plan = plans[0]
                refusal = (plan.status, plan.retry_after)
                plan.left -= 1
                if plan.left == 0:
                    plans.popleft()
            elif len(self._recent) >= self._per_second:
                refusal = (self._load_status, self._load_retry_after)
            else:
                self._recent.append(now)
            refused = refusal[0] if refusal else None
            self._log.append(Request(now, op, method, path, refused, body))
        if refusal is not None:
            status, retry_after = refusal
            code, message = THROTTLED if status == 429 else BUSY
            headers = {} if retry_after is None else {"Retry-After": _seconds(retry_after)}
            raise BatchError(status, code, message, headers=headers)

    def requests(self, op: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._log if op is None or r.operation == op]

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(r.operation for r in self._log)

    def clear(self) -> None:
        with self._lock:
            self._log.clear()


def _seconds(value: float) -> str:
    """Retry-After in seconds: a whole number, as HTTP has it, unless a test asks for less."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
