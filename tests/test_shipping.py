"""The environment ships itself: with ``staging_url=``, Batch nodes that start from a bare
Python get the client's cloudmap (a wheel) and versions, through Azure Blob (Azurite) and
the start task's resource files, on the Batch emulator."""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import cloudpickle
import fsspec
import pytest

import cloudmap
from cloudmap import environment
from cloudmap.node import compat

from .azurite import running_azurite
from .batch_emulator import BatchEmulator, running_batch_emulator

pytestmark = pytest.mark.usefixtures("scheduler_in_the_client")

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def node_versions(_: object) -> dict[str, str]:
    from cloudmap.node import compat

    return {**compat.versions(), "executable": sys.executable}


# -- the rule, with plain values -------------------------------------------------------------


def test_bare_names_are_pinned_to_the_clients_versions_and_the_rest_kept() -> None:
    installed = {"numpy": "2.0.1", "dask": "2026.8.0"}.get
    assert environment.pinned(
        ["numpy", "dask", "scipy", "requests>=2", "pkg @ https://x/pkg.whl"], installed
    ) == ("numpy==2.0.1", "dask==2026.8.0", "scipy", "requests>=2", "pkg @ https://x/pkg.whl")
    # A package naming a project the nodes need replaces its pin.
    requirements = environment.requirements_for(["NumPy>=2", "scipy"])
    assert "NumPy>=2" in requirements
    assert not any(r.startswith("numpy==") for r in requirements)
    assert any(r.startswith("dask==") for r in requirements)


def test_the_wheel_is_this_cloudmap_and_built_once(tmp_path: Path) -> None:
    first = environment.cloudmap_wheel(tmp_path)
    assert environment.cloudmap_wheel(tmp_path) == first  # the same content: no rebuild
    names = zipfile.ZipFile(first).namelist()
    assert "cloudmap/environment.py" in names
    assert any(name.endswith(".dist-info/METADATA") for name in names)


def test_an_installed_distribution_repacks_into_a_wheel_pip_installs(tmp_path: Path) -> None:
    # What ships when cloudmap was installed from a wheel, not from a source tree.
    wheel = environment._repacked_wheel(metadata.distribution("cloudpickle"), tmp_path)
    assert wheel.name == f"cloudpickle-{metadata.version('cloudpickle')}-py3-none-any.whl"
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(wheel)], check=True)
    assert (target / "cloudpickle" / "__init__.py").is_file()


def test_a_local_project_in_packages_ships_as_a_wheel_of_its_own(tmp_path: Path) -> None:
    project = tmp_path / "mylab"
    (project / "mylab").mkdir(parents=True)
    (project / "mylab" / "__init__.py").write_text("ANSWER = 42\n")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "mylab"\nversion = "1.2.3"\n'
    )
    # A bare name the client has not installed is kept as it is (an installed one would be
    # pinned to the client's version: scipy is, once scikit-learn is in the test extra).
    absent = "cloudmap-test-absent-project"
    shipped = environment.shipment([str(project), absent], cache=tmp_path / "wheels")
    assert [w.name for w in shipped.wheels][1] == "mylab-1.2.3-py3-none-any.whl"
    assert str(project) not in shipped.requirements and absent in shipped.requirements


def test_a_staging_url_the_nodes_cannot_read_is_refused_before_anything_starts() -> None:
    with pytest.raises(cloudmap.InputError, match="abfs://<container>/<folder>"):
        cloudmap.Pool.plan("azure", staging_url="s3://bucket/env", storage_options={})
    plan = cloudmap.Pool.plan("azure", staging_url="abfs://env/ship", packages=["dask"])
    start_task = plan["requests"][0]["body"]["startTask"]
    settings = {s["name"]: s["value"] for s in start_task["environmentSettings"]}
    pins = settings["CLOUDMAP_SHIP_REQUIREMENTS"].split()
    assert pins.count(f"dask=={environment.installed_version('dask')}") == 1
    assert f"numpy=={environment.installed_version('numpy')}" in pins
    assert start_task["resourceFiles"][0]["filePath"].startswith("cloudmap-")


# -- end to end: Azurite, the emulator, a bare Python on the nodes -------------------------


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with nothing installed: no cloudmap, no dask, no numpy."""
    root = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import cloudmap"], capture_output=True, cwd=root)
    assert probe.returncode != 0, "the bare environment must not see cloudmap"
    return python


@pytest.fixture(scope="module")
def blob() -> Iterator[str]:
    with running_azurite() as connection_string:
        yield connection_string


@pytest.fixture
def batch(tmp_path: Path) -> Iterator[BatchEmulator]:
    with running_batch_emulator(tmp_path / "batch", node_start_delay=0.05) as emulator:
        yield emulator


def shipping_options(batch: BatchEmulator, python: Path, blob: str, **more: object) -> dict:
    return {
        "account_url": batch.url,
        "credential": batch.credential(),
        "python": str(python),
        "vm_size": "Standard_D2s_v5",
        "staging_url": "abfs://cloudmap-env/ship",
        "storage_options": {"connection_string": blob},
        "start_timeout": 300,
        **more,
    }


def test_a_bare_node_gets_the_clients_cloudmap_and_versions(
    batch: BatchEmulator, bare_python: Path, blob: str
) -> None:
    started = time.monotonic()
    with cloudmap.Pool("azure", nodes=1, **shipping_options(batch, bare_python, blob)) as pool:
        pool.wait_for_nodes(timeout=300)
        cold_start = time.monotonic() - started
        assert pool.map(lambda x: x * x, range(5), progress=False) == [0, 1, 4, 9, 16]
        [node] = pool.map(node_versions, [0], progress=False)
        shipped = pool.provider.shipped  # type: ignore[union-attr]
    assert node["executable"].endswith("cloudmap-env/bin/python")  # the node's own venv
    assert {k: v for k, v in node.items() if k != "executable"} == compat.versions()
    assert shipped is not None and shipped.requirements[0].startswith("dask==")
    print(f"cold start of a node from a bare Python: {cold_start:.1f} s")

    # The same content is not uploaded again by the next pool.
    fs, _ = fsspec.core.url_to_fs("abfs://cloudmap-env", connection_string=blob)
    wheels = fs.glob("cloudmap-env/ship/*/*.whl")
    assert [w.rsplit("/", 1)[-1] for w in wheels] == list(shipped.wheels)
    with cloudmap.Pool("azure", nodes=0, **shipping_options(batch, bare_python, blob)) as again:
        assert again.provider.shipped.uploaded == ()  # type: ignore[union-attr]
        assert again.provider.shipped.wheels == shipped.wheels  # type: ignore[union-attr]


def test_staging_without_a_key_is_refused_before_a_pool_is_made(batch: BatchEmulator) -> None:
    options = {"account_url": batch.url, "credential": batch.credential()}
    with pytest.raises(cloudmap.InputError, match="storage account key"):
        cloudmap.Pool("azure", nodes=1, staging_url="abfs://env/ship", **options)
    assert list(batch.client().list_pools()) == []


def test_a_package_that_cannot_be_installed_fails_the_node_with_pips_message(
    batch: BatchEmulator, bare_python: Path, blob: str
) -> None:
    missing = "cloudmap-test-no-such-package-404"
    options = shipping_options(batch, bare_python, blob, packages=[missing])
    with pytest.raises(cloudmap.PoolStartError) as raised:
        cloudmap.Pool("azure", nodes=1, **options)
    message = str(raised.value)
    assert f"No matching distribution found for {missing}" in message, message
    assert list(batch.client().list_pools()) == []
