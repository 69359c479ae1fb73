"""The processes of one emulated compute node: its directory tree and its start task.

A real Batch node is a VM; here it is a directory under the emulator's root and, once the
node boots, one ``/bin/sh -c <commandLine>`` process started in a new session, so that it and
anything it leaves behind (a node agent started with ``nohup ... &``) share one process group
that can be killed as a unit when the node is removed, preempted or its pool deleted.

Linux only: whether a node's processes are gone is read from /proc.

Nothing here takes the emulator's state lock: the start task runs and is waited for on a
thread of its own, and reports each attempt through callbacks, so the HTTP thread never waits
on a process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Sub-directories Batch creates under a Linux node's root ($AZ_BATCH_NODE_ROOT_DIR).
NODE_DIRS = ("applications", "fsmounts", "shared", "startup", "startup/wd", "volatile", "workitems")


@dataclass(frozen=True)
class StartTaskSpec:
    """What a node needs from the pool's ``startTask`` to run it."""

    command_line: str
    environment: Mapping[str, str]
    max_retries: int  # Batch's maxTaskRetryCount: 0 = run once, -1 = retry without limit
    resource_files: tuple[tuple[str, str], ...] = ()  # (httpUrl, filePath) pairs


@dataclass(frozen=True)
class Attempt:
    """The outcome of one run of the start task."""

    number: int  # 0 for the first run, then 1, 2, ... for retries
    started: float
    ended: float
    exit_code: int
    will_retry: bool
    error: str | None = None  # set when the process could not even be launched


def node_layout(root: Path) -> dict[str, Path]:
    """Create the node's directory tree and return the paths the environment points at."""
    for sub in NODE_DIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {
        "root": root,
        "shared": root / "shared",
        "startup": root / "startup",
        "startup_wd": root / "startup" / "wd",
        "mounts": root / "fsmounts",
    }


def session_pids(sid: int) -> list[int]:
    """The live (non-zombie) processes of a session, read from /proc (Linux).

    A node is its start task's session, not its process group: what the start task leaves
    running may move to process groups of its own (MPICH's hydra puts its ranks in theirs),
    and a VM that goes away takes all of them.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return sorted(found)


def kill_session(sid: int) -> None:
    """SIGKILL every live process of the session (orphans killed stay zombies until
    whatever reaps orphans here gets to them, so /proc decides what is alive)."""
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class NodeProcesses:
    """The directory tree and start-task process group of one node."""

    def __init__(self, root: Path) -> None:
        self.dirs = node_layout(root)
        self.root = root
        self._lock = threading.Lock()
        self._killed = False
        self._process: subprocess.Popen[bytes] | None = None
        self._sessions: set[int] = set()
        self._thread: threading.Thread | None = None

    def start(
        self,
        spec: StartTaskSpec,
        env: Mapping[str, str],
        on_start: Callable[[int, float], None],
        on_exit: Callable[[Attempt], None],
    ) -> None:
        """Run the start task (with retries) on a thread; report each attempt's start and end.

        ``env`` is the whole environment of the node (the start task's own settings are
        added on top of it).
        """
        env = {**env, **spec.environment}
        self._thread = threading.Thread(
            target=self._run, args=(spec, env, on_start, on_exit), name="batch-emulator-start-task"
        )
        self._thread.daemon = True
        self._thread.start()

    def _run(
        self,
        spec: StartTaskSpec,
        env: dict[str, str],
        on_start: Callable[[int, float], None],
        on_exit: Callable[[Attempt], None],
    ) -> None:
        number = 0
        while True:
            started = time.time()
            on_start(number, started)
            exit_code, error = self._attempt(spec, env)
            if self._killed:
                return
            retries_left = spec.max_retries < 0 or number < spec.max_retries
            will_retry = exit_code != 0 and retries_left
            on_exit(Attempt(number, started, time.time(), exit_code, will_retry, error))
            if not will_retry:
                return
            number += 1

    def _attempt(self, spec: StartTaskSpec, env: dict[str, str]) -> tuple[int, str | None]:
        startup, wd = self.dirs["startup"], self.dirs["startup_wd"]
        try:
            for url, file_path in spec.resource_files:
                target = (wd / file_path).resolve()
                target.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(url, timeout=30) as response:
                    target.write_bytes(response.read())
        except OSError as exc:
            return -1, f"resource file download failed: {exc}"
        with (
            open(startup / "stdout.txt", "wb") as stdout,
            open(startup / "stderr.txt", "wb") as stderr,
        ):
            with self._lock:
                if self._killed:
                    return -1, None
                try:
                    process = subprocess.Popen(
                        ["/bin/sh", "-c", spec.command_line],
                        cwd=wd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=stdout,
                        stderr=stderr,
                        start_new_session=True,
                    )
                except OSError as exc:
                    return -1, f"could not launch the start task: {exc}"
                self._process = process
                self._sessions.add(process.pid)
            return process.wait(), None

    def kill(self) -> None:
        """SIGKILL every process group this node started; return at once (see ``gone``)."""
        with self._lock:
            self._killed = True
            sessions = list(self._sessions)
        for sid in sessions:
            kill_session(sid)

    def gone(self) -> bool:
        """True once no process this node started is alive (the start task itself is reaped)."""
        with self._lock:
            process, sessions = self._process, list(self._sessions)
        if process is not None and process.poll() is None:
            return False
        return not any(session_pids(sid) for sid in sessions)

    def kill_and_wait(self, timeout: float = 10.0) -> None:
        """Kill and block until every process is gone (for the admin helpers and shutdown)."""
        self.kill()
        deadline = time.monotonic() + timeout
        while not self.gone():
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of node {self.root.name} survived SIGKILL")
            self.kill()  # a process may have forked while the others were killed
            time.sleep(0.01)
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def pids(self) -> list[int]:
        """Live processes of the node: the start task and whatever it left running."""
        with self._lock:
            sessions = list(self._sessions)
        return sorted(pid for sid in sessions for pid in session_pids(sid))
