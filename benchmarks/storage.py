"""Files through a pool: ``map(inputs=, outputs=)`` against adlfs used from the client.

Every case moves the same files from one place in storage to another, each file downloaded
once and uploaded once, on Azurite (the Azure Storage emulator, started by this script on
this machine) and on local folders:

- cloudmap, abfs: ``pool.map(size_of, names, inputs="abfs://<source>/<set>/{item}",
  outputs="abfs://<target>/<set>/{item}", storage_options=...)`` on ``Pool(nodes=2)``. The
  output names the same file name as the input, in another container, so the file each
  item downloads is the file it uploads; ``size_of`` only returns the file's size. What is
  measured is staging: per item a fresh working directory, the input's existence check and
  download, the output's directory check and upload.
- adlfs, one file at a time: ``fs.get_file`` then ``fs.put_file`` per file, in a loop in the
  client process (the requests one slot makes for one item, without the checks).
- adlfs, one file at a time, with staging's checks: the same loop plus the two requests
  staging adds per file, ``fs.exists`` on the input and ``fs.makedirs`` on the output's
  folder (on Azure Blob the latter asks whether the container exists).
- adlfs, 2 threads: the same per-file pair on a ``ThreadPoolExecutor(2)``, as many at once
  as the pool has slots.
- adlfs, fs.get + fs.put: all files down with one ``fs.get(paths, local_paths)``, then all
  up with one ``fs.put``; adlfs runs the requests of each call concurrently.
- cloudmap, file:// and fsspec, file://: the same map with local folders, and one
  ``fs.get`` + ``fs.put`` on fsspec's local filesystem, for reference: what staging costs
  without a network.

Two data sets: many small files (500 x 4 KiB) and a few large ones (4 x 32 MiB); the
bytes are random. Files/s is files over wall time; MB/s is the data set's size (10^6
bytes) over wall time, each byte being downloaded once and uploaded once.

Method: the source files are uploaded once (not timed). Each timed run writes into a new,
empty container (or folder), checked afterwards for every file and its size and then
deleted (Azurite keeps everything in memory). A round opens ``Pool(nodes=2)``, waits for
both nodes, and warms the slots up with a small map from Azurite and one from a folder
(imports, the filesystem objects fsspec keeps per process); the client's peers are warmed
up too. Then every case runs once per data set, the order shifted by one case per round.
Medians over rounds are reported, with the CPU seconds used by the client process, by the
pool's node processes and by Azurite. Azurite, the pool and the client share this
machine's cores, so the figures say what staging costs relative to a client doing the same
transfers here, not what Azure Blob Storage would give.

Run ``python benchmarks/storage.py`` (3 rounds, about a minute and a half on 2 cores;
``--quick`` for one round with smaller sets, ``--json PATH`` for the raw numbers). Progress
goes to stderr; stdout is the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import adlfs
import fsspec
import psutil
from machine import OtherLoad

import cloudmap

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.azurite starts the emulator
from tests.azurite import running_azurite  # noqa: E402

NODES = 2
THREADS = 2  # the threaded peer: as many transfers at once as the pool has slots
CASES = [
    "cloudmap, abfs",
    "adlfs, one file at a time",
    "adlfs, one file at a time, with staging's checks",
    f"adlfs, {THREADS} threads",
    "adlfs, fs.get + fs.put",
    "cloudmap, file://",
    "fsspec, file://, fs.get + fs.put",
]
KIB, MIB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class DataSet:
    name: str
    files: int
    size: int  # bytes per file

    @property
    def names(self) -> list[str]:
        return [f"f{i:04d}.bin" for i in range(self.files)]

    @property
    def total(self) -> int:
        return self.files * self.size

    def label(self) -> str:
        size = f"{self.size // MIB} MiB" if self.size >= MIB else f"{self.size // KIB} KiB"
        return f"{self.files} x {size}"


FULL = [DataSet("small", 500, 4 * KIB), DataSet("large", 4, 32 * MIB)]
QUICK = [DataSet("small", 100, 4 * KIB), DataSet("large", 2, 8 * MIB)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def size_of(name: str) -> int:
    """The item's function: its input is in the working directory; it is also the output."""
    return os.path.getsize(name)


# -- where the files are -----------------------------------------------------------------


@dataclass
class Store:
    """One backend: a URL scheme, its fsspec filesystem, and how to make a fresh target."""

    kind: str  # "abfs" or "file"
    fs: Any
    options: dict[str, Any]
    source: str  # root of the source files, without scheme: "<container>" or a folder
    scratch: Path  # local folder for targets (file://)

    def url(self, root: str, path: str) -> str:
        return f"{self.kind}://{root}/{path}"

    def new_target(self) -> str:
        if self.kind == "abfs":
            container = f"t{uuid.uuid4().hex[:12]}"
            self.fs.mkdir(container)
            return container
        folder = self.scratch / f"t{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        return str(folder)

    def check_and_remove(self, target: str, data: DataSet) -> None:
        """Every file arrived with its size; then the target goes (Azurite holds it in RAM)."""
        found = self.fs.find(f"{target}/{data.name}", detail=True)
        sizes = sorted(info["size"] for info in found.values())
        if sizes != [data.size] * data.files:
            raise AssertionError(f"{self.kind}: {len(sizes)} files of sizes {set(sizes)} arrived")
        if self.kind == "abfs":
            self.fs.rm(target, recursive=True)
        else:
            shutil.rmtree(target)


def upload_sources(abfs: Store, local: Path, sets: list[DataSet]) -> None:
    """Random files into a local folder (the file:// source) and the same into Azurite."""
    for data in sets:
        folder = local / data.name
        folder.mkdir(parents=True)
        paths = []
        for name in data.names:
            (folder / name).write_bytes(os.urandom(data.size))
            paths.append(str(folder / name))
        abfs.fs.put(paths, [f"{abfs.source}/{data.name}/{n}" for n in data.names])


# -- the cases ----------------------------------------------------------------------------

Case = Callable[[Store, DataSet, str, Path], None]


def cloudmap_case(pool: cloudmap.Pool) -> Case:
    def run(store: Store, data: DataSet, target: str, _: Path) -> None:
        sizes = pool.map(
            size_of,
            data.names,
            inputs=store.url(store.source, f"{data.name}/{{item}}"),
            outputs=store.url(target, f"{data.name}/{{item}}"),
            storage_options=store.options,
            progress=False,
        )
        assert sizes == [data.size] * data.files

    return run


def pair(store: Store, data: DataSet, target: str, local: Path, name: str) -> None:
    path = str(local / name)
    store.fs.get_file(f"{store.source}/{data.name}/{name}", path)
    store.fs.put_file(path, f"{target}/{data.name}/{name}")


def one_at_a_time(store: Store, data: DataSet, target: str, local: Path) -> None:
    for name in data.names:
        pair(store, data, target, local, name)


def checked(store: Store, data: DataSet, target: str, local: Path) -> None:
    """One at a time, with the two requests staging adds per file: exists and makedirs."""
    for name in data.names:
        source = f"{store.source}/{data.name}/{name}"
        assert store.fs.exists(source)
        store.fs.get_file(source, str(local / name))
        store.fs.makedirs(f"{target}/{data.name}", exist_ok=True)
        store.fs.put_file(str(local / name), f"{target}/{data.name}/{name}")


def threads(store: Store, data: DataSet, target: str, local: Path) -> None:
    with ThreadPoolExecutor(THREADS) as executor:
        list(executor.map(lambda n: pair(store, data, target, local, n), data.names))


def get_then_put(store: Store, data: DataSet, target: str, local: Path) -> None:
    locals_ = [str(local / name) for name in data.names]
    store.fs.get([f"{store.source}/{data.name}/{n}" for n in data.names], locals_)
    store.fs.makedirs(f"{target}/{data.name}", exist_ok=True)  # file:// needs the folder
    store.fs.put(locals_, [f"{target}/{data.name}/{n}" for n in data.names])


# -- measuring ----------------------------------------------------------------------------


class Cpu:
    """CPU seconds so far of this process, the pool's node processes and Azurite."""

    @staticmethod
    def sample() -> dict[str, float]:
        me = psutil.Process()
        totals = {"client": sum(me.cpu_times()[:2]), "nodes": 0.0, "azurite": 0.0}
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                kind = "azurite" if "azurite" in " ".join(child.cmdline()) else "nodes"
                totals[kind] += sum(child.cpu_times()[:2])
        return totals


def measure(case: Case, store: Store, data: DataSet, scratch: Path) -> dict[str, float]:
    target = store.new_target()
    local = Path(tempfile.mkdtemp(dir=scratch))
    before = Cpu.sample()
    started = time.perf_counter()
    case(store, data, target, local)
    wall = time.perf_counter() - started
    after = Cpu.sample()
    shutil.rmtree(local)
    store.check_and_remove(target, data)
    return {"wall": wall, **{kind: after[kind] - before[kind] for kind in before}}


def shifted(names: list[str], by: int) -> list[str]:
    by %= len(names)
    return names[by:] + names[:by]


def one_round(
    number: int,
    stores: dict[str, Store],
    sets: list[DataSet],
    scratch: Path,
    raw: dict[str, list[dict[str, float]]],
) -> None:
    with cloudmap.Pool(nodes=NODES) as pool:
        pool.wait_for_nodes()
        kinds = ["abfs"] * 5 + ["file"] * 2
        functions = [cloudmap_case(pool), one_at_a_time, checked, threads, get_then_put]
        functions += [cloudmap_case(pool), get_then_put]
        cases = dict(zip(CASES, zip(kinds, functions, strict=True), strict=True))
        warm = DataSet(sets[0].name, 2 * NODES, sets[0].size)
        for kind, case in cases.values():  # imports, fsspec's filesystem objects, batch sizes
            measure(case, stores[kind], warm, scratch)
        for data in sets:
            for name in shifted(list(cases), number):
                kind, case = cases[name]
                figures = measure(case, stores[kind], data, scratch)
                raw.setdefault(f"{data.name}: {name}", []).append(figures)
                log(f"  {data.label()}: {name}: {figures['wall']:.2f} s")


# -- report -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, smaller data sets")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    rounds, sets = (1, QUICK) if args.quick else (3, FULL)
    raw: dict[str, list[dict[str, float]]] = {}
    load = OtherLoad()
    with (
        tempfile.TemporaryDirectory(prefix="cloudmap-storage-bench-") as tmp,
        running_azurite() as connection_string,
    ):
        scratch = Path(tmp)
        options = {"connection_string": connection_string}
        abfs_fs = fsspec.filesystem("abfs", **options)
        source = f"s{uuid.uuid4().hex[:12]}"
        abfs_fs.mkdir(source)
        stores = {
            "abfs": Store("abfs", abfs_fs, options, source, scratch),
            "file": Store("file", fsspec.filesystem("file"), {}, str(scratch / "source"), scratch),
        }
        log("uploading the source files")
        upload_sources(stores["abfs"], scratch / "source", sets)
        for number in range(1, rounds + 1):
            log(f"round {number}/{rounds}")
            one_round(number, stores, sets, scratch, raw)
    other = load.share()

    print(
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; cloudmap {cloudmap.__version__}, fsspec "
        f"{fsspec.__version__}, adlfs {adlfs.__version__}; Azurite (in memory) on this "
        f"machine. `Pool(nodes={NODES})`, 1 slot per node. Medians of {rounds} round(s); other "
        f"processes used {other:.0%} of the CPUs during the run.\n"
    )
    for data in sets:
        print(f"## {data.label()} ({data.total / 1e6:.1f} MB), each file down once and up once\n")
        print("| case | wall s | files/s | MB/s | vs cloudmap, abfs | CPU s: client / nodes "
              "/ Azurite |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---|")
        reference = statistics.median(r["wall"] for r in raw[f"{data.name}: cloudmap, abfs"])
        for name in CASES:
            runs = raw[f"{data.name}: {name}"]
            wall = statistics.median(r["wall"] for r in runs)
            cpu = " / ".join(
                f"{statistics.median(r[kind] for r in runs):.2f}"
                for kind in ("client", "nodes", "azurite")
            )
            print(
                f"| {name} | {wall:.2f} | {data.files / wall:,.0f} | "
                f"{data.total / wall / 1e6:.1f} | {reference / wall:.2f}x | {cpu} |"
            )
        print()
    print('("vs cloudmap, abfs": its wall time over the case\'s; above 1x the case is faster.)')
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
