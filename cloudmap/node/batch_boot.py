"""The second half of an Azure Batch start task: start the node agent, report its outcome.

``python -m cloudmap.node.batch_boot``, run by the start task's command line once cloudmap
is importable. It writes the node configuration (from the start task's environment, where
the secrets travel) to ``$AZ_BATCH_NODE_ROOT_DIR/cloudmap/node.json``, starts the node agent
in the background, and waits until the agent has run the user's start task and launched
its slots. Its exit code is the start task's outcome, so Batch shows the node ``idle`` or
``starttaskfailed`` as the user's start task went, and its output (Batch's
``startup/stdout.txt``) ends with the user's.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import compat, start_task
from .agent import NodeConfig
from .layout import CONFIG_FILE, NodeLayout
from .scheduler import READY_FILE
from .slot import TLS_DIR_VARIABLE, write_certificates

CONFIG_VARIABLE = "CLOUDMAP_NODE_CONFIG"
#: The node configuration's role of the node that hosts the pool's scheduler.
SCHEDULER_ROLE = "scheduler"
#: Exit code when the agent itself failed (not the user's start task).
AGENT_FAILED = 91
#: Seconds the slots have to join the scheduler once started (Dask's own connection
#: attempts give up after 60 s, and the agent then starts the slot again).
JOIN_TIMEOUT = 150.0


def main() -> int:
    encoded = os.environ.pop(CONFIG_VARIABLE, None)  # not inherited by the agent and slots
    if not encoded:
        print(f"[cloudmap] {CONFIG_VARIABLE} is not set: not a cloudmap pool?", file=sys.stderr)
        return AGENT_FAILED
    settings = json.loads(base64.b64decode(encoded))
    refusal = compat.mismatch(settings.pop("client_versions", {}))
    if refusal:
        print(f"[cloudmap] {refusal}", file=sys.stderr)
        return AGENT_FAILED
    root = Path(os.environ["AZ_BATCH_NODE_ROOT_DIR"]) / "cloudmap"
    root.mkdir(parents=True, exist_ok=True)
    if settings.get("role") == SCHEDULER_ROLE:
        return _start_scheduler(root, int(settings["scheduler_port"]), settings["tls"])
    layout = NodeLayout(root)
    pickled = settings.pop("start_task_pickle", None)
    if pickled:  # a Python callable: the agent runs it as the start task
        path = root / "start_task.pkl"
        path.write_bytes(base64.b64decode(pickled))
        settings["start_task"] = start_task.command(str(path))
    NodeConfig(node_id=os.environ["AZ_BATCH_NODE_ID"], watch_stdin=False, **settings).dump(
        root / CONFIG_FILE
    )
    (root / "state.json").unlink(missing_ok=True)
    with (root / "agent.log").open("ab") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "cloudmap.node", str(root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    state, problem = _wait_for_slots(layout, agent, int(settings["slots"]))
    stdout, stderr = layout.read_start_task_output()
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    if problem is None:
        scheduler = settings["scheduler"]
        message = f"[cloudmap] node agent running (pid {agent.pid}), slots joined {scheduler}"
        print(message, file=sys.stderr)  # stdout stays the user's start task's own
        return 0
    if agent.poll() is None:
        agent.terminate()  # the node is not usable: nothing of cloudmap's stays on it
    problem = f"[cloudmap] the node could not start: {problem}\n"
    sys.stderr.write(problem)
    if state.get("state") != "start_failed":
        # A reason of cloudmap's own, which the start task's output (shown first by the
        # provider) does not hold: add it there.
        with (layout.startup / "stderr.txt").open("a") as own:
            own.write(problem)
    code = state.get("start_task_exit_code")
    return int(code) if isinstance(code, int) and code > 0 else AGENT_FAILED


def _start_scheduler(root: Path, port: int, tls: dict[str, str]) -> int:
    """This node hosts the pool's scheduler (cloudmap.node.scheduler), not slots: start it
    in the background and end the start task once it listens, or with why it does not."""
    env = {**os.environ, TLS_DIR_VARIABLE: str(write_certificates(root, tls))}
    ready = root / READY_FILE
    ready.unlink(missing_ok=True)
    with (root / "scheduler.log").open("ab") as log:
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "cloudmap.node.scheduler", str(port), str(root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not ready.exists():
        if scheduler.poll() is not None or time.monotonic() > deadline:
            if scheduler.poll() is None:
                scheduler.kill()
            tail = (root / "scheduler.log").read_text(errors="replace")[-4000:]
            print(f"[cloudmap] the pool's scheduler did not start:\n{tail}", file=sys.stderr)
            return AGENT_FAILED
        time.sleep(0.05)
    address = json.loads(ready.read_text())["address"]
    print(f"[cloudmap] the pool's scheduler listens at {address} (pid {scheduler.pid})")
    return 0


def _wait_for_slots(
    layout: NodeLayout, agent: subprocess.Popen[bytes], slots: int
) -> tuple[dict[str, Any], str | None]:
    """Wait until every slot has joined the scheduler once; return the agent's last state
    and, if the node cannot serve, why.

    The start task ends only then, so that a node whose slots cannot start (a broken
    environment) or cannot reach the scheduler (networking) shows in Batch as
    ``starttaskfailed``, with the reason in its output, rather than as an idle VM that
    never serves and is billed until someone looks.
    """
    joined: set[int] = set()
    ready_since: float | None = None
    while True:
        state = layout.read_state() or {}
        name = state.get("state")
        if name == "start_failed":
            return state, "its start task or node setup failed"
        if name == "unusable":
            return state, str(state.get("reason", "the node agent found it unusable"))
        if name == "ready":
            ready_since = ready_since or time.monotonic()
            joined |= {n for n in range(slots) if layout.slot_joined(n)}
            if len(joined) == slots:
                return state, None
            if time.monotonic() - ready_since > JOIN_TIMEOUT:
                return state, _not_joined(layout, slots - len(joined), slots)
        if agent.poll() is not None:
            log = (layout.root / "agent.log").read_text(errors="replace")[-4000:]
            return state, f"the node agent exited with {agent.returncode}:\n{log}"
        time.sleep(0.1)


def _not_joined(layout: NodeLayout, missing: int, slots: int) -> str:
    tail = (layout.slots / "slot-0.log").read_text(errors="replace")[-1000:].strip()
    return (
        f"{missing} of {slots} slots did not join the scheduler within {JOIN_TIMEOUT:g} s. "
        "The nodes must reach the client's scheduler (its address, port and firewall; "
        f"see cloudmap's Azure guide, networking). The end of slots/slot-0.log:\n{tail}"
    )


if __name__ == "__main__":
    sys.exit(main())
