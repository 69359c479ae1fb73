"""A node's application files and packages, installed before its start task runs.

Batch pools list resource files (downloaded to every node as it joins) and, in practice, a
start task that installs packages. cloudmap does both from ``Pool(resource_files=...,
packages=...)``: files go to the node's shared directory, packages are pip-installed into
the node's own ``packages`` directory (first on the slots' import path), and the output of
both is kept in ``startup/setup.txt``. A failure makes the node ``start_failed``, with that
output shown as the start task's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from .layout import NodeLayout


def install(
    layout: NodeLayout,
    resource_files: list[list[str]],
    packages: list[str],
    storage_options: dict[str, Any],
    env: dict[str, str],
) -> tuple[int, str]:
    """Download files and install packages; return (exit code, log text)."""
    log: list[str] = []
    for url, relative in resource_files:
        target = layout.shared / relative
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url, **storage_options)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(target))
        except Exception as exc:
            log.append(f"cannot download resource file {url}: {type(exc).__name__}: {exc}")
            return 1, "\n".join(log) + "\n"
        log.append(f"downloaded {url} -> shared/{relative}")
    if packages:
        command = [
            sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--quiet", "--target", str(package_directory(layout)), *packages,
        ]  # fmt: skip
        log.append("$ pip install --target packages " + " ".join(packages))
        done = subprocess.run(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
        )
        log.append(done.stdout.decode(errors="replace").rstrip())
        if done.returncode != 0:
            log.append(f"pip exited with status {done.returncode}")
            return done.returncode, "\n".join(log) + "\n"
    return 0, "\n".join(log) + "\n"


def package_directory(layout: NodeLayout) -> Path:
    return layout.root / "packages"
