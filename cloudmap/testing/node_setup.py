"""Conformance: application files and packages reach every node as it starts."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

import cloudmap

from . import tasks
from .capabilities import requires
from .harness import ProviderHarness
from .stores import blob_connection_string, blob_store

NAME, VERSION = "cloudmap_demo_package", "1.0"


def _wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, built by hand so that pip installs it offline."""
    files = {
        f"{NAME}/__init__.py": "def greet(x):\n    return f'hello {x}'\n",
        f"{NAME}-{VERSION}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {NAME.replace('_', '-')}\nVersion: {VERSION}\n"
        ),
        f"{NAME}-{VERSION}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: cloudmap-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record_name = f"{NAME}-{VERSION}.dist-info/RECORD"
    files[record_name] = "\n".join([*record, f"{record_name},,"]) + "\n"
    path = directory / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


class NodeSetupTests:
    """Resource files and packages: downloaded and installed before the slots join, and a
    start that cannot do so fails with the reason."""

    @requires("local_nodes")  # a resource file and the wheel are in the test's directory
    def test_resource_files_and_packages_reach_every_node(
        self, harness: ProviderHarness, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        (tmp_path / "model.txt").write_text("weights v3")
        connection_string = blob_connection_string(request)
        app = blob_store(connection_string)
        app.write("config.ini", "[run]\nmode=fast\n")
        with harness.make_pool(
            nodes=2,
            resource_files=[f"file://{tmp_path}/model.txt", (app.url("config.ini"), "etc/run.ini")],
            storage_options=app.options,
            packages=[str(_wheel(tmp_path))],
        ) as pool:
            pool.wait_for_nodes()
            assert pool.map(tasks.read_resource, ["model.txt", "etc/run.ini"], batch_size=1) == [
                "weights v3",
                "[run]\nmode=fast\n",
            ]
            assert pool.map(tasks.use_package, [1, 2]) == ["hello 1", "hello 2"]
            setup_log = pool.node(pool.nodes()[0].id).read_file("startup/setup.txt")
            assert f"downloaded {app.url('config.ini')}" in setup_log
            assert connection_string not in setup_log
            assert connection_string not in repr(pool.spec)

    def test_a_package_that_cannot_install_makes_the_node_start_failed(
        self, harness: ProviderHarness
    ) -> None:
        with pytest.raises(cloudmap.PoolStartError) as caught:
            harness.make_pool(nodes=1, packages=["/nowhere/missing-1.0-py3-none-any.whl"])
        assert "pip exited with status" in str(caught.value)
        assert "missing-1.0-py3-none-any.whl" in str(caught.value)

    def test_a_resource_file_that_cannot_download(
        self, harness: ProviderHarness, tmp_path: Path
    ) -> None:
        with pytest.raises(cloudmap.PoolStartError, match=r"cannot download resource file file://"):
            harness.make_pool(nodes=1, resource_files=[f"file://{tmp_path}/absent.bin"])
