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

#: The pool scheduler's options, wherever it runs (the client's process, a pool node):
#: ``allowed_failures=0`` reports a task whose slot died at once (cloudmap decides what
#: that costs the items: cloudmap.failures); ``validate`` checks are for Dask's own tests.
SCHEDULER_OPTIONS: dict[str, Any] = {"allowed_failures": 0, "validate": False}

#: Dask batches small messages for up to 10 ms (client to scheduler) and 5 ms (scheduler to
#: worker) to save syscalls under heavy load; for cloudmap, whose tasks are already batches,
#: that latency is what a tiny map or a submit() waits for. 1 ms keeps most of the saving.
BATCH_INTERVAL = 0.001

#: The versions of ``distributed`` the suite has run on; pyproject.toml pins the same range.
#: cloudmap relies on the private parts below, which a new release may change.
DISTRIBUTED_VERSIONS = ">=2026.8.0,<2026.9"

#: Dask's private (or undocumented) parts that cloudmap relies on, as (owner, attribute, who
#: uses it): the cluster glue, the scheduler plugin and the slot runner are the only users,
#: and tests/test_dask_internals.py checks each on a live scheduler, worker and client, so
#: that an upgrade of ``distributed`` fails there, naming what changed, not in a map.
PRIVATE_DASK_API: tuple[tuple[str, str, str], ...] = (
    ("Client", "_close", "cluster: close a client cut off too long, from its event loop"),
    ("Client", "_timeout", "cluster: how long a client reconnects to a remote scheduler"),
    ("Scheduler", "_reschedule", "scheduler_plugin: move a task not yet begun off a slot"),
    ("Scheduler", "handle_worker_status_change", "scheduler_plugin: drain a slot at once"),
    ("Scheduler", "stream_handlers", "scheduler_plugin: screen slots' status reports"),
    ("Scheduler", "stream_comms", "scheduler_plugin: tell a slot its status; batching; close"),
    ("Scheduler", "queued", "scheduler_plugin: tasks waiting for a slot"),
    ("Scheduler", "unrunnable", "scheduler_plugin: tasks waiting for a slot"),
    ("Scheduler", "running", "scheduler_plugin: slots that take tasks (rebalance)"),
    ("Scheduler.TaskState", "run_id", "scheduler_plugin: which assignment began"),
    ("Scheduler.TaskState", "processing_on", "scheduler_plugin: where a task runs"),
    ("Scheduler.WorkerState", "processing", "scheduler_plugin: tasks assigned to a slot"),
    ("Client", "scheduler_comm", "cluster: shorter message batching to the scheduler"),
    ("BatchedSend", "interval", "cluster, scheduler_plugin: shorter message batching"),
    ("BatchedSend", "recent_message_log", "node.runner: the start event is on the wire"),
    ("KilledWorker", "last_worker", "cluster: which slot a lost task was last on"),
    ("distributed.worker", "thread_state", "node.runner: the key of the running task"),
    ("Worker", "batched_stream", "node.runner: send the start event at once"),
    ("Worker", "state", "node.runner: the task's state (cancelled?) and run id"),
    ("Worker.TaskState", "run_id", "node.runner: the assignment this start belongs to"),
    ("Scheduler", "_broker", "scheduler_plugin: keep fewer of cloudmap's own events"),
    ("Broker", "_topics", "scheduler_plugin: keep fewer of cloudmap's own events"),
    ("Topic", "events", "scheduler_plugin: keep fewer of cloudmap's own events"),
    ("Scheduler", "handlers", "scheduler_plugin: serve pool.share's objects to slots"),
    ("Client", "scheduler", "scheduler_plugin: send pool.share's objects to the scheduler"),
    ("Worker", "scheduler", "scheduler_plugin: a slot fetches a shared object"),
    ("Worker", "loop", "scheduler_plugin: a slot fetches a shared object"),
)
