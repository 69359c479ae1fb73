"""Command-line tasks: ``pool.run("tr a-z A-Z < {input} > {output}", items, ...)``.

Each item runs a shell command in its own working directory on a node, with its inputs
already downloaded there and its outputs uploaded after (see :mod:`cloudmap.staging`). This
module is the client's side: the command's template checked before any work is sent, and
the :class:`CommandResult` each item returns. The slot's side, which runs the command, is
:mod:`cloudmap.node.command_task`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .staging import template_fields

COMMAND_FIELDS = ("item", "index", "input", "inputs", "output", "outputs")
#: Characters of each stream's end kept in a CommandResult and in a CommandError.
TAIL = 4000


@dataclass(frozen=True)
class CommandResult:
    """One item of ``pool.run``: how its command ended and where its files are.

    ``outputs`` are the URLs its output files were uploaded to; ``stdout`` and ``stderr``
    the ends of its streams (the whole files are ``directory``/stdout.txt and stderr.txt on
    ``node``).
    """

    item: Any
    exit_code: int
    outputs: list[str]
    node: str
    directory: str
    stdout: str
    stderr: str


def check_command(command: object, *, has_inputs: bool, has_outputs: bool) -> str:
    """Validate a command template before any work is sent."""
    if not isinstance(command, str) or not command.strip():
        raise InputError(f"command={command!r} is not valid: pass a shell command string")
    for name, root in template_fields(command, "the command"):
        if root not in COMMAND_FIELDS:
            fields = ", ".join("{" + f + "}" for f in COMMAND_FIELDS)
            raise InputError(
                f"the command {command!r} names the field {{{name}}}, which does not exist; "
                f"its fields are {fields} (write {{{{ and }}}} for literal braces)"
            )
        if root.startswith("input") and not has_inputs:
            raise InputError(f"the command uses {{{root}}} but no inputs= were given")
        if root.startswith("output") and not has_outputs:
            raise InputError(f"the command uses {{{root}}} but no outputs= were given")
    return command
