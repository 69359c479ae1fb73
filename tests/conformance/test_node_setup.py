"""Application files and packages installed on every node as it starts."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import fsspec
import pytest

import cloudmap
from tests.azurite import running_azurite

from . import tasks

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


def test_resource_files_and_packages_reach_every_node(provider: str, tmp_path: Path) -> None:
    (tmp_path / "model.txt").write_text("weights v3")
    with running_azurite() as connection_string:
        options = {"connection_string": connection_string}
        fs = fsspec.filesystem("abfs", **options)
        fs.mkdir("app")
        fs.pipe("app/config.ini", b"[run]\nmode=fast\n")
        with cloudmap.Pool(
            provider,
            nodes=2,
            resource_files=[
                f"file://{tmp_path}/model.txt",
                ("abfs://app/config.ini", "etc/run.ini"),
            ],
            storage_options=options,
            packages=[str(_wheel(tmp_path))],
        ) as pool:
            pool.wait_for_nodes()
            assert pool.map(tasks.read_resource, ["model.txt", "etc/run.ini"], batch_size=1) == [
                "weights v3",
                "[run]\nmode=fast\n",
            ]
            assert pool.map(tasks.use_package, [1, 2]) == ["hello 1", "hello 2"]
            node = pool.nodes()[0].id
            assert "downloaded abfs://app/config.ini" in pool.node(node).read_file(
                "startup/setup.txt"
            )
            assert connection_string not in pool.node(node).read_file("startup/setup.txt")
            assert connection_string not in repr(pool.spec)


def test_a_package_that_cannot_install_makes_the_node_start_failed(provider: str) -> None:
    with pytest.raises(cloudmap.PoolStartError) as caught:
        cloudmap.Pool(provider, nodes=1, packages=["/nowhere/missing-1.0-py3-none-any.whl"])
    assert "pip exited with status" in str(caught.value)
    assert "missing-1.0-py3-none-any.whl" in str(caught.value)


def test_a_resource_file_that_cannot_download(provider: str, tmp_path: Path) -> None:
    with pytest.raises(cloudmap.PoolStartError, match=r"cannot download resource file file://"):
        cloudmap.Pool(provider, nodes=1, resource_files=[f"file://{tmp_path}/absent.bin"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"resource_files": [("file:///x", "../escape")]}, "must stay inside"),
        ({"resource_files": [42]}, "resource_files entry 42"),
        ({"packages": [""]}, "not a pip requirement"),
        ({"storage_options": "secret"}, "storage_options must be a dict"),
    ],
)
def test_bad_node_setup_arguments(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(cloudmap.InputError, match=message):
        cloudmap.Pool(nodes=0, **arguments)  # type: ignore[arg-type]
