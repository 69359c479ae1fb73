"""Input and output files of tasks, in any fsspec storage: Batch's resource and output files.

What ``map(fn, items, inputs=..., outputs=...)`` means, checked in the client before any
work is sent: URLs are templates filled per item with ``{item}`` and ``{index}``
(``{item[0]}`` and ``{item.name}`` work too); outputs are uploaded as each output's
condition says (``on="success"``, ``"failure"`` or ``"always"``), as Batch's output files
are. Local folders (``file://``), Azure Blob (``abfs://``, with adlfs) and any other fsspec
filesystem look alike. The slot's side (downloads, the call, uploads) is
:mod:`cloudmap.node.staged_call`; :func:`current_files` tells a running call its files.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

UPLOAD_CONDITIONS = ("success", "failure", "always")
TEMPLATE_FIELDS = ("item", "index")


@dataclass(frozen=True)
class Output:
    """An output file: ``url`` (a template), uploaded when the call ends as ``on`` says.

    The file the task must write is the URL's last path component, in its working
    directory: ``Output("abfs://renders/{item}.png")`` uploads ``<item>.png``.
    """

    url: str
    on: str = "success"

    def __post_init__(self) -> None:
        if self.on not in UPLOAD_CONDITIONS:
            choices = ", ".join(map(repr, UPLOAD_CONDITIONS))
            raise InputError(f"Output(on={self.on!r}) is not one of {choices}")
        check_template(self.url, "outputs")


@dataclass(frozen=True)
class TaskFiles:
    """The files of the item being called: its working directory and local paths."""

    directory: Path
    inputs: list[Path]
    outputs: list[Path]
    output_urls: list[str]
    item: Any = None
    index: int = -1


_current: TaskFiles | None = None


def current_files() -> TaskFiles:
    """The working directory and file paths of the item running now in this slot."""
    if _current is None:
        raise RuntimeError("no staged task is running here (map with inputs= or outputs=)")
    return _current


def set_current_files(files: TaskFiles | None) -> None:
    """Set by the slot's staging (:mod:`cloudmap.node.staged_call`) around each call."""
    global _current
    _current = files


def template_fields(template: str, what: str) -> list[tuple[str, str]]:
    """Each ``{field}`` of a format template as (as written, its root name): ``{item[0]}``
    gives ("item[0]", "item"). A malformed template is an InputError naming ``what``."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise InputError(f"{what} {template!r} is malformed ({exc})") from None
    return [(name, name.split(".", 1)[0].split("[", 1)[0]) for name in names]


def check_template(template: object, argument: str) -> list[str]:
    """Validate a URL template; return the item fields it uses (empty: a shared file)."""
    if not isinstance(template, str) or not template:
        raise InputError(f"{argument} takes URL strings, got {template!r}")
    if template.startswith("memory://"):
        raise InputError(
            f"{argument}={template!r}: memory:// lives inside one process, and each node is "
            "a process of its own; use file:// (a local folder) or abfs:// instead"
        )
    used = []
    for name, root in template_fields(template, f"the {argument} template"):
        if root not in TEMPLATE_FIELDS:
            raise InputError(
                f"the {argument} template {template!r} names the field {{{name}}}, which does "
                f"not exist; use {{item}} (or {{item[0]}}, {{item.attr}}) and {{index}}"
            )
        used.append(root)
    return used


def as_inputs(inputs: str | Sequence[str] | None) -> tuple[str, ...]:
    if inputs is None:
        return ()
    templates = (inputs,) if isinstance(inputs, str) else tuple(inputs)
    for template in templates:
        check_template(template, "inputs")
    return templates


def as_outputs(outputs: str | Output | Sequence[str | Output] | None) -> tuple[Output, ...]:
    if outputs is None:
        return ()
    listed = [outputs] if isinstance(outputs, (str, Output)) else list(outputs)
    return tuple(o if isinstance(o, Output) else Output(o) for o in listed)
