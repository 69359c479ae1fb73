"""The client's environment as nodes must have it: a wheel of this cloudmap, and pins.

A node unpickles what the client pickled, so it must run the client's cloudmap and the
client's versions of what cloudmap runs on. Nodes that cannot import cloudmap (a plain
Batch image) get it shipped (``staging_url=``): a wheel of the very cloudmap the client runs
(built from its source when it is an editable or path install, else repacked from the
installed files), and the rule for versions, kept simple:

- :data:`NODE_REQUIREMENTS` (what a node imports to run tasks) are pinned to the client's
  installed versions;
- each ``packages=`` entry that names only a project is pinned to the client's version of it
  when the client has it; an entry with a version, a marker or a URL is kept as written,
  and replaces the pin of the same project;
- a ``packages=`` entry that is a local project directory (your own package, path-installed
  or editable) is built into a wheel and shipped like cloudmap's.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import InputError
from .node.compat import NODE_REQUIREMENTS

#: Where built wheels are kept between pools, by a hash of the source they came from.
WHEEL_CACHE = Path.home() / ".cache" / "cloudmap" / "wheels"
_PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Shipment:
    """What the start task installs: ``wheels`` (without their dependencies), then
    ``requirements`` (pinned, with theirs)."""

    wheels: tuple[Path, ...]
    requirements: tuple[str, ...]


def installed_version(name: str) -> str | None:
    """The version of ``name`` installed here, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pinned(
    requirements: Iterable[str], installed: Callable[[str], str | None] = installed_version
) -> tuple[str, ...]:
    """Each bare project name pinned to ``installed(name)`` when known; others as written."""
    pins = []
    for requirement in requirements:
        text = requirement.strip()
        version = installed(text) if _PROJECT_NAME.match(text) else None
        pins.append(f"{text}=={version}" if version else text)
    return tuple(pins)


def requirements_for(packages: Iterable[str]) -> tuple[str, ...]:
    """The pins of :data:`NODE_REQUIREMENTS` and ``packages``; a package that names one of
    the former replaces its pin (a version that then differs from the client's is refused
    as the node starts, naming both)."""
    listed = [str(p) for p in packages]
    named = {project_name(p) for p in listed}
    own = [name for name in NODE_REQUIREMENTS if name not in named]
    return pinned([*own, *listed])


def project_name(requirement: str) -> str:
    """The project a requirement names, normalised: ``NumPy>=2`` gives ``numpy``."""
    name = re.split(r"[\s<>=!~;\[@(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def shipment(packages: Iterable[str] = (), cache: Path = WHEEL_CACHE) -> Shipment:
    """This cloudmap as a wheel, each ``packages=`` entry that is a local project directory
    as a wheel too, and :func:`requirements_for` the other entries."""
    wheels, remote = [cloudmap_wheel(cache)], []
    for entry in map(str, packages):
        if _is_project(entry):
            wheels.append(_built_wheel(Path(entry).expanduser(), cache, name=None))
        else:
            remote.append(entry)
    return Shipment(tuple(wheels), requirements_for(remote))


def _is_project(entry: str) -> bool:
    """A local directory pip can build: a path-installed or editable project of yours."""
    path = Path(entry).expanduser()
    return path.is_dir() and any((path / f).is_file() for f in ("pyproject.toml", "setup.py"))


def cloudmap_wheel(cache: Path = WHEEL_CACHE) -> Path:
    """A wheel of the cloudmap this process runs, built once per content."""
    package = Path(__file__).resolve().parent
    if (package.parent / "pyproject.toml").is_file():  # a source tree: editable, or on sys.path
        return _built_wheel(package.parent, cache, name="cloudmap")
    return _repacked_wheel(_installed_distribution(package), cache)


def _installed_distribution(package: Path) -> metadata.Distribution:
    """The installed distribution whose files hold this cloudmap package."""
    for distribution in metadata.distributions(name="cloudmap"):
        for file in distribution.files or ():
            located = Path(str(distribution.locate_file(file))).resolve()
            if str(file).endswith("cloudmap/__init__.py") and located.parent == package:
                return distribution
    raise InputError(
        f"cannot tell which installed distribution holds {package}; pass install= (a wheel "
        "or git URL of cloudmap the nodes can reach) instead"
    )


def _tree_hash(source: Path) -> str:
    """A hash of what a wheel of the project is built from: its files, but for hidden ones
    (version control, virtual environments, tool caches) and build output."""
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(source):
        subfolders[:] = sorted(d for d in subfolders if not _skipped(d))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            digest.update(str(path.relative_to(source)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _skipped(folder: str) -> bool:
    return (
        folder.startswith(".")
        or folder.endswith(".egg-info")
        or folder in ("__pycache__", "build", "dist", "node_modules")
    )


def _built_wheel(source: Path, cache: Path, *, name: str | None) -> Path:
    """A wheel of the project at ``source`` (``pip wheel``), built once per content."""
    target = cache / _tree_hash(source)
    found = sorted(target.glob("*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    found = sorted(target.glob("*.whl"))
    if built.returncode != 0 or not found:
        what = name or str(source)
        raise InputError(
            f"cannot build a wheel of {what} from {source} to ship to the nodes "
            f"(pip wheel exited with {built.returncode}):\n{built.stderr[-2000:]}\n"
            "Fix the project, or give the nodes a wheel or git URL of it instead"
        )
    return found[0]


def _repacked_wheel(distribution: metadata.Distribution, cache: Path) -> Path:
    """A wheel made of the installed files (those RECORD lists), as pip installed them."""
    files = [f for f in distribution.files or () if not str(f).endswith(".pyc")]
    if not files:
        raise InputError(
            f"the installed files of {distribution.metadata['Name']} are not listed, so they "
            "cannot be shipped; pass install= (a wheel or git URL the nodes can reach) instead"
        )
    contents = {str(f): Path(str(distribution.locate_file(f))).read_bytes() for f in files}
    info = next(name.split("/")[0] for name in contents if ".dist-info/" in name)
    contents.pop(f"{info}/RECORD", None)
    digest = hashlib.sha256(b"".join(contents[name] for name in sorted(contents))).hexdigest()
    project = re.sub(r"[-_.]+", "_", distribution.metadata["Name"])
    target = cache / digest[:16] / f"{project}-{distribution.version}-py3-none-any.whl"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name in sorted(contents):
            wheel.writestr(name, contents[name])
            sha = base64.urlsafe_b64encode(hashlib.sha256(contents[name]).digest()).rstrip(b"=")
            writer.writerow([name, f"sha256={sha.decode()}", len(contents[name])])
        writer.writerow([f"{info}/RECORD", "", ""])
        wheel.writestr(f"{info}/RECORD", record.getvalue())
    return target
