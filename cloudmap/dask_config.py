"""Dask settings for cloudmap's scheduler and slots: less background work on shared cores.

Dask's defaults suit long-lived clusters on many machines. Locally, the scheduler and the
slots share the same few cores as the computation, and every periodic callback wakes an
event loop that must take its process's GIL from the task thread. These settings keep
what cloudmap uses and slow down or drop the rest.
"""

from __future__ import annotations

from typing import Any

LOW_OVERHEAD: dict[str, Any] = {
    # The event-loop health check runs every 20 ms by default (50 wake-ups a second).
    "distributed.admin.tick.interval": "1s",
    # psutil samples for the dashboard every 500 ms by default.
    "distributed.admin.system-monitor.interval": "2s",
    # The statistical profiler samples task threads every 10 ms; cloudmap shows no profile.
    "distributed.worker.profile.enabled": False,
    # Results are fetched and released at once; there are no replicas to manage.
    "distributed.scheduler.active-memory-manager.start": False,
    # Batches are sized to balance the slots already, and a stolen task would run on a
    # slot other than the one it told the client it started on.
    "distributed.scheduler.work-stealing": False,
}
