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

from . import compat, start_task
from .agent import NodeConfig
from .layout import CONFIG_FILE, NodeLayout

CONFIG_VARIABLE = "CLOUDMAP_NODE_CONFIG"
#: Exit code when the agent itself failed (not the user's start task).
AGENT_FAILED = 91


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
    while True:
        state = layout.read_state() or {}
        if state.get("state") in ("ready", "start_failed", "unusable"):
            break
        if agent.poll() is not None:
            print(f"[cloudmap] the node agent exited with {agent.returncode}", file=sys.stderr)
            sys.stderr.write((root / "agent.log").read_text(errors="replace")[-4000:])
            return AGENT_FAILED
        time.sleep(0.1)
    stdout, stderr = layout.read_start_task_output()
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    if state["state"] == "ready":
        scheduler = settings["scheduler"]
        message = f"[cloudmap] node agent running (pid {agent.pid}), slots joining {scheduler}"
        print(message, file=sys.stderr)  # stdout stays the user's start task's own
        return 0
    code = state.get("start_task_exit_code")
    print(f"[cloudmap] the node could not start: {state}", file=sys.stderr)
    return int(code) if isinstance(code, int) and code > 0 else AGENT_FAILED


if __name__ == "__main__":
    sys.exit(main())
