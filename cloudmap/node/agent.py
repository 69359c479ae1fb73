"""The node agent's life: directories, start task, one supervised worker process per slot, stop.

It reports its state in ``state.json`` for the provider (creating -> starting -> ready, or
start_failed; leaving when told to stop). It stops when its stdin closes, so a node never
outlives the client that made it, even if that client is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nodes import slot_name
from . import provision
from .layout import CONFIG_FILE, JOINED_MARKER, NodeLayout
from .slot import TLS_DIR_VARIABLE, write_certificates

#: A slot that fails this many times to join within RESTART_WINDOW seconds makes the node
#: unusable. Slots that die after joining (a task crashed or overran) are always restarted.
MAX_QUICK_RESTARTS = 5
#: Characters of a failing slot's log kept in the node's reason for being unusable.
LOG_TAIL = 1000
RESTART_WINDOW = 30.0
#: Grace given to slot processes between SIGTERM and SIGKILL when the node stops.
STOP_GRACE = 3.0


@dataclass
class NodeConfig:
    """What the provider tells the agent, as ``node.json`` in the node's root directory."""

    pool_id: str
    node_id: str
    scheduler: str
    slots: int
    env: dict[str, str]
    start_task: list[str] | None = None
    start_task_timeout: float | None = None
    resource_files: list[list[str]] = field(default_factory=list)  # [url, path in shared/]
    packages: list[str] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict)  # may hold credentials
    tls: dict[str, str] = field(default_factory=dict)  # ca, cert, key (PEM); secret
    #: Stop when stdin closes (a local node dies with its client). Batch nodes live until
    #: Batch removes them, so their agent does not watch.
    watch_stdin: bool = True

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        return cls(**json.loads(path.read_text()))

    def dump(self, path: Path) -> None:
        # Storage credentials may be in here: only the node's user may read it.
        path.touch(mode=0o600)
        path.write_text(json.dumps(self.__dict__))


class NodeAgent:
    def __init__(self, root: Path) -> None:
        self.layout = NodeLayout(root)
        self.config = NodeConfig.load(root / CONFIG_FILE)
        self.env = {
            **os.environ,
            # One thread per slot: keep BLAS and OpenMP from oversubscribing the cores.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            **self.config.env,
            **self.layout.environment(self.config.pool_id, self.config.node_id),
        }
        if self.config.tls:
            directory = write_certificates(self.layout.root, self.config.tls)
            self.env[TLS_DIR_VARIABLE] = str(directory)
        self._stop = threading.Event()
        self._slots: dict[int, subprocess.Popen[bytes]] = {}
        self._restarts: dict[int, list[float]] = {}

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        if self.config.watch_stdin:
            threading.Thread(target=self._watch_stdin, daemon=True).start()
        self.layout.make()
        self.layout.write_state("starting")
        if self.config.resource_files or self.config.packages:
            exit_code = self._set_up()
            if exit_code != 0:
                self.layout.write_state("start_failed", start_task_exit_code=exit_code)
                return 3
        if self.config.start_task is not None:
            exit_code = self._run_start_task(self.config.start_task)
            if exit_code != 0:
                self.layout.write_state("start_failed", start_task_exit_code=exit_code)
                return 3
        if self._stop.is_set():
            return 0
        for slot in range(self.config.slots):
            self._start_slot(slot)
        self.layout.write_state("ready", start_task_exit_code=0 if self.config.start_task else None)
        state = self._supervise()
        self._stop_slots()
        return 0 if state == "leaving" else 4

    def _set_up(self) -> int:
        """Resource files and packages (cloudmap.node.provision); the log goes where the start
        task's output is shown, so a failure reads like a failed start task."""
        code, log = provision.install(
            self.layout,
            self.config.resource_files,
            self.config.packages,
            self.config.storage_options,
            self.env,
        )
        (self.layout.startup / "setup.txt").write_text(log)
        if code != 0:
            (self.layout.startup / "stderr.txt").write_text(log)
        if self.config.packages:
            target = str(provision.package_directory(self.layout))
            paths = [target, self.env.get("PYTHONPATH", "")]
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return code

    def _watch_stdin(self) -> None:
        """The provider holds our stdin open; EOF means it is gone or wants us to stop."""
        try:
            while sys.stdin.buffer.read(1):
                pass
        except OSError:
            pass
        self._stop.set()

    def _run_start_task(self, argv: list[str]) -> int:
        startup = self.layout.startup
        with (startup / "stdout.txt").open("wb") as out, (startup / "stderr.txt").open("wb") as err:
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=startup,
                    env=self.env,
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                )
            except OSError as exc:
                err.write(f"cannot start the start task {argv!r}: {exc}\n".encode())
                return 127
            deadline = (
                time.monotonic() + self.config.start_task_timeout
                if self.config.start_task_timeout
                else None
            )
            while process.poll() is None:
                if self._stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                    process.kill()
                    process.wait()
                    if not self._stop.is_set():
                        err.write(
                            f"\n[cloudmap] start task killed after "
                            f"{self.config.start_task_timeout:g} s\n".encode()
                        )
                    return -9
                time.sleep(0.02)
            return process.returncode

    def _start_slot(self, slot: int) -> None:
        name = slot_name(self.config.node_id, slot)
        directory = self.layout.slots / f"slot-{slot}"
        directory.mkdir(exist_ok=True)
        (directory / JOINED_MARKER).unlink(missing_ok=True)
        with (self.layout.slots / f"slot-{slot}.log").open("ab") as log:
            self._slots[slot] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cloudmap.node.slot",
                    self.config.scheduler,
                    name,
                    str(directory),
                ],
                cwd=self.layout.tasks,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _supervise(self) -> str:
        """Restart slots that die (a timeout or a crash kills one on purpose) until stopped."""
        while not self._stop.wait(0.05):
            for slot, process in list(self._slots.items()):
                if process.poll() is None:
                    continue
                if not self.layout.slot_joined(slot):
                    now = time.monotonic()
                    recent = [t for t in self._restarts.get(slot, []) if now - t < RESTART_WINDOW]
                    if len(recent) >= MAX_QUICK_RESTARTS:
                        log = self.layout.slots / f"slot-{slot}.log"
                        tail = log.read_text(errors="replace")[-LOG_TAIL:].strip()
                        self.layout.write_state(
                            "unusable",
                            reason=f"slot {slot} failed to start {len(recent) + 1} times; the "
                            f"end of slots/slot-{slot}.log:\n{tail}",
                        )
                        return "unusable"
                    self._restarts[slot] = [*recent, now]
                self._start_slot(slot)
        self.layout.write_state("leaving")
        return "leaving"

    def _stop_slots(self) -> None:
        for process in self._slots.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for process in self._slots.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cloudmap.node NODE_ROOT_DIR", file=sys.stderr)
        return 2
    return NodeAgent(Path(argv[0])).run()
