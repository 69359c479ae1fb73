"""How the Azure provider waits out a Batch that throttles it (429) or is too busy (503).

Two layers, each bounded:

- every request, each page of a listing included, goes through the SDK's pipeline, whose
  retry step is :class:`BatchRetryPolicy`: it obeys a ``Retry-After`` header as given,
  and otherwise waits exponentially longer with jitter, capped, before each of at most
  ``retries`` retries of a 429, a 5xx or a connection that failed;
- a poll whose request still fails after those retries (:func:`transient`) is not an error
  for the pool: the provider keeps what it last saw and tries again after a wait that
  grows the same way (:class:`Backoff`).

:class:`PushBack` says so in the log once per spell of refusals, and once when Batch
answers again, however many retries there were in between.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

#: Statuses Batch answers when it did not do the work and the same request may be sent
#: again: throttled, busy, or a front end that timed out.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def jittered(attempt: int, base: float, cap: float) -> float:
    """The wait before retry ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)``, at most
    ``cap``, times a random factor in [0.5, 1] so that clients refused together do not
    come back together."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


def transient(exc: BaseException) -> bool:
    """Whether a failed request may work when sent again later (Batch pushed back, or the
    connection failed), as opposed to one Batch refused for what it asked."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return True
    return getattr(exc, "status_code", None) in TRANSIENT_STATUSES


class PushBack:
    """Batch's refusals as the user sees them: one warning when a spell of them starts,
    one line when Batch answers again; nothing per retry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._refusals = 0
        #: Spells of refusals so far (for tests and the pool's diagnostics).
        self.spells = 0

    def refused(self, what: str) -> None:
        with self._lock:
            self._refusals += 1
            if self._since is not None:
                return
            self._since = time.monotonic()
            self.spells += 1
        logger.warning(
            "cloudmap: Azure Batch answered %s; the provider backs off and retries (this is "
            "said once until Batch answers again)",
            what,
        )

    def answered(self) -> None:
        with self._lock:
            if self._since is None:
                return
            took, refusals = time.monotonic() - self._since, self._refusals
            self._since, self._refusals = None, 0
        logger.info(
            "cloudmap: Azure Batch answers again, after %d refused or failed requests over %.1f s",
            refusals,
            took,
        )


def retry_policy(*, retries: int, backoff: float, backoff_max: float, push_back: PushBack) -> Any:
    """The retry step for the provider's ``BatchClient`` (its ``retry_policy=``)."""
    return _policy_class()(
        retries=retries, backoff=backoff, backoff_max=backoff_max, push_back=push_back
    )


@functools.cache
def _policy_class() -> type:
    """Made on first use: the SDK is an optional dependency (``cloudmap[azure]``)."""
    from azure.core.pipeline.policies import RetryPolicy

    class BatchRetryPolicy(RetryPolicy):
        """azure-core's retry step with Batch's needs: a jittered, capped exponential backoff
        from the first retry on (azure-core retries the first one at once, without jitter), a
        429 retried whatever the method (Batch did nothing with it), and the refusals reported
        to a :class:`PushBack` instead of per retry."""

        def __init__(
            self, *, retries: int, backoff: float, backoff_max: float, push_back: PushBack
        ) -> None:
            super().__init__(
                retry_total=retries,
                retry_connect=retries,
                retry_read=retries,
                retry_status=retries,
                retry_backoff_factor=backoff,
                retry_backoff_max=backoff_max,
            )
            self.push_back = push_back

        def get_backoff_time(self, settings: dict[str, Any]) -> float:
            attempt = len(settings["history"])
            if attempt == 0:
                return 0.0
            return jittered(attempt, settings["backoff"], settings["max_backoff"])

        def is_retry(self, settings: dict[str, Any], response: Any) -> bool:
            if response.http_response.status_code == 429 and settings["total"]:
                return True
            return bool(super().is_retry(settings, response))

        def increment(
            self, settings: dict[str, Any], response: Any = None, error: Exception | None = None
        ) -> bool:
            if error is not None:
                what = f"no answer ({type(error).__name__})"
            else:
                http = getattr(response, "http_response", None)
                status = getattr(http, "status_code", "?")
                after = http.headers.get("Retry-After") if http is not None else None
                what = f"{status}" + (f" with Retry-After: {after}" if after else "")
            self.push_back.refused(what)
            return bool(super().increment(settings, response=response, error=error))

        def send(self, request: Any) -> Any:
            response = super().send(request)
            if response.http_response.status_code not in TRANSIENT_STATUSES:
                self.push_back.answered()
            return response

    return BatchRetryPolicy


class Backoff:
    """Waits between polls that failed for a transient reason: :meth:`failed` says how
    long until the next try (jittered, doubling, capped), :meth:`succeeded` starts over."""

    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap = base, cap
        self.failures = 0
        self.until = 0.0  # monotonic time before which not to try again

    def ready(self) -> bool:
        return time.monotonic() >= self.until

    def failed(self) -> float:
        self.failures += 1
        wait = jittered(self.failures, self.base, self.cap)
        self.until = time.monotonic() + wait
        return wait

    def succeeded(self) -> None:
        self.failures, self.until = 0, 0.0
