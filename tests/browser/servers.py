"""Jupyter servers (JupyterLab, Voilà) that a browser test starts on 127.0.0.1 and stops.

Each runs in a process group of its own with private Jupyter directories, so the user's
settings never leak in and everything it started (kernels, pool nodes) can be stopped
together, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Server:
    url: str
    token: str
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_jupyter_env(home: Path) -> dict[str, str]:
    """Jupyter's config, data, runtime, settings and workspace dirs under ``home``; the
    venv's share/jupyter (bqplot's and ipywidgets' extensions) stays on the data path."""
    env = dict(os.environ)
    for name, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
        ("IPYTHONDIR", "ipython"),
    ):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(home / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return env


@contextlib.contextmanager
def running_server(argv: list[str], port: int, token: str, home: Path) -> Iterator[Server]:
    """Start a Jupyter server command, wait until it answers, and always stop it.

    SIGTERM first, so the server shuts its kernels down (and their pools close their
    nodes); then SIGKILL to the whole group for whatever is left.
    """
    log = home / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=home,
            env=private_jupyter_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_answering(url, process, log)
        yield Server(url=url, token=token, log=log)
    finally:
        _stop_group(process)


def _wait_until_answering(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=2):
                return
        except OSError as exc:  # refused, or 403/404 from a server that is up
            if getattr(exc, "code", None) in (403, 404):
                return
        time.sleep(0.3)
    raise RuntimeError(f"the server did not answer within 90 s:\n{log.read_text()}")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    # Kernels and pool nodes that outlived the server: kill whatever is left of the group.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


#: JupyterLab user settings for the tests: render every cell (the default windowing skips
#: cells out of view, so their outputs would not be in the page), and no news prompt.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def jupyter_lab(home: Path) -> contextlib.AbstractContextManager[Server]:
    port, token = free_port(), "cloudmap-test-token"
    for name, settings in LAB_SETTINGS.items():
        path = home / "lab-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    argv = [
        str(BIN / "jupyter-lab"),
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={home}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=",
        "--LabApp.extension_manager=readonly",
        "--ServerApp.allow_root=True",
    ]
    return running_server(argv, port, token, home)


def voila(notebook: Path, home: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    argv = [
        str(BIN / "voila"),
        str(notebook),
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        f"--port={port}",
        f"--Voila.root_dir={notebook.parent}",
        "--ServerApp.allow_root=True",
    ]
    return running_server(argv, port, "", home)
