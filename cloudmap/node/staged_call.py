"""Staging on the slot: download an item's inputs, call the function, upload its outputs.

``map(fn, items, inputs=..., outputs=...)`` wraps ``fn`` in a :class:`StagedCall`, which
travels to the nodes like any function (what the options mean, and their checks before any
work is sent, are in :mod:`cloudmap.staging`). For each item, on the slot, it makes a fresh
working directory, downloads the item's inputs into it (inputs that name no item field are
shared: downloaded once per node into a cache), calls ``fn`` there, and uploads the output
files the call left according to each output's condition, as Batch's output files do.
Storage options (credentials) travel inside the pickled call, never on a command line or in
a log, and the repr hides them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StagingError
from ..staging import Output, TaskFiles, check_template, set_current_files
from .runner import current_index

_made: set[tuple[str, str]] = set()  # (filesystem token, folder) this slot has made


@dataclass
class StagedCall:
    """``fn`` with its files staged around each call (see the module docstring)."""

    fn: Callable[..., Any]
    star: bool
    inputs: tuple[str, ...]
    outputs: tuple[Output, ...]
    job: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Where output files are expected, relative to the working directory: "" for Python
    #: functions (they write plain names), "outputs" for commands, so that
    #: ``tr < {input} > {output}`` works when input and output share a file name.
    outputs_dir: str = ""
    #: Tells the slot's runner to keep track of item indices for this function.
    needs_index = True

    def __repr__(self) -> str:  # never show storage options (they hold credentials)
        return f"StagedCall({getattr(self.fn, '__name__', self.fn)!r}, job={self.job!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        index = current_index()
        item = args if self.star else args[0]
        fields = {"item": item, "index": index}
        directory = _fresh_directory(self.job, index)
        written = directory / self.outputs_dir
        written.mkdir(exist_ok=True)
        inputs = [self._download(template, fields, directory) for template in self.inputs]
        outputs = [(o, _fill(o.url, fields, index)) for o in self.outputs]
        set_current_files(
            TaskFiles(
                directory,
                inputs,
                [written / _basename(u) for _, u in outputs],
                [u for _, u in outputs],
                item,
                index,
            )
        )
        previous = os.getcwd()
        os.chdir(directory)
        try:
            value = self.fn(*args, **kwargs)
        except BaseException as exc:
            try:
                self._upload(outputs, written, index, succeeded=False)
            except StagingError as upload_error:  # the call's own error matters more
                if hasattr(exc, "add_note"):
                    exc.add_note(f"(and its failure outputs were not uploaded: {upload_error})")
            raise
        finally:
            os.chdir(previous)
            set_current_files(None)
        self._upload(outputs, written, index, succeeded=True)
        return value

    def _download(self, template: str, fields: dict[str, Any], directory: Path) -> Path:
        index = fields["index"]
        url = _fill(template, fields, index)
        target = directory / _basename(url)
        shared = not check_template(template, "inputs")
        try:
            if shared:
                shutil.copyfile(self._cached(url), target)  # a copy: tasks may write to it
            else:
                self._get(url, target)
        except FileNotFoundError:
            raise StagingError(f"input {url} of item {index} does not exist") from None
        except StagingError:
            raise
        except Exception as exc:
            raise StagingError(
                f"cannot download input {url} of item {index}: {type(exc).__name__}: {exc}"
            ) from None
        return target

    def _cached(self, url: str) -> Path:
        """A shared input, downloaded once per node and map (slots race harmlessly: the last
        rename wins); a later map downloads it again, so a changed file is seen."""
        root = Path(os.environ.get("CLOUDMAP_NODE_SHARED_DIR", os.getcwd())) / "input-cache"
        key = hashlib.sha256(url.encode()).hexdigest()[:24]
        cached = root / self.job / key / _basename(url)
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f".{cached.name}.{uuid.uuid4().hex[:8]}")
            self._get(url, partial)
            os.replace(partial, cached)
        return cached

    def _get(self, url: str, target: Path) -> None:
        fs, path = _filesystem(url, self.storage_options)
        fs.get_file(path, str(target))  # FileNotFoundError when it does not exist

    def _upload(
        self, outputs: list[tuple[Output, str]], directory: Path, index: int, *, succeeded: bool
    ) -> None:
        wanted = "success" if succeeded else "failure"
        for output, url in outputs:
            if output.on not in (wanted, "always"):
                continue
            local = directory / _basename(url)
            if not local.exists():
                if succeeded:
                    raise StagingError(
                        f"output {url} of item {index}: the task wrote no file {local.name!r} "
                        f"in {directory}"
                    )
                continue  # a failed call need not have written its outputs
            try:
                fs, path = _filesystem(url, self.storage_options)
                parent = path.rsplit("/", 1)[0]
                made = (str(getattr(fs, "_fs_token", id(fs))), parent)
                if parent and parent != path and made not in _made:
                    fs.makedirs(parent, exist_ok=True)  # once per folder, store and slot
                    _made.add(made)
                fs.put_file(str(local), path)
            except Exception as exc:
                raise StagingError(
                    f"cannot upload output {url} of item {index}: {type(exc).__name__}: {exc}"
                ) from None


def _fill(template: str, fields: dict[str, Any], index: int) -> str:
    try:
        return template.format(**fields)
    except (IndexError, KeyError, AttributeError, TypeError, ValueError) as exc:
        raise StagingError(
            f"the template {template!r} does not fit item {index} ({fields['item']!r}): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _basename(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise StagingError(f"the URL {url} names no file")
    return name


def _fresh_directory(job: str, index: int) -> Path:
    """A new, empty working directory per attempt: a retry never sees a failed one's files."""
    tasks = Path(os.environ.get("CLOUDMAP_NODE_TASKS_DIR", os.getcwd()))
    directory = tasks / job / f"item-{index}-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True)
    return directory


def _filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path
