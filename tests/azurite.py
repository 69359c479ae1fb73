"""Azurite, the Azure Storage emulator, as a process a test session starts and stops.

Installed from npm by ``make test`` (``package.json``); it listens on 127.0.0.1 on a free
port and keeps everything in memory. Clients use the emulator's well-known account.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ACCOUNT = "devstoreaccount1"
#: The emulator's published development key (not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
BINARY = Path(__file__).resolve().parent.parent / "node_modules" / ".bin" / "azurite-blob"


def connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_azurite(timeout: float = 30.0) -> Iterator[str]:
    """Start azurite-blob; yield its connection string; stop it, whatever happens."""
    if not BINARY.exists():
        raise RuntimeError(f"{BINARY} is missing: run `make test`, which installs Azurite")
    port = _free_port()
    process = subprocess.Popen(
        [
            str(BINARY),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(port),
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--silent",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None:
                error = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"azurite-blob exited with {process.returncode}: {error}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"azurite-blob did not listen on port {port} in {timeout} s")
            time.sleep(0.1)
        yield connection_string(port)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
