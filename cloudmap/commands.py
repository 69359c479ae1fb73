"""Command-line tasks: ``pool.run("tr a-z A-Z < {input} > {output}", items, ...)``.

Each item runs a shell command in its own working directory on a node, with its inputs
already downloaded there and its outputs uploaded after (see :mod:`cloudmap.staging`). The
command's stdout and stderr go to ``stdout.txt`` and ``stderr.txt`` in that directory, as
Batch keeps them for each task; the result carries their ends, the node and the directory,
so the whole files can be read back with ``pool.node(id).read_file(...)``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

from .errors import CommandError, InputError
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


@dataclass(frozen=True)
class CommandTask:
    """The function ``pool.run`` maps: run the command for the current staged item."""

    command: str

    def __call__(self, item: Any) -> CommandResult:
        from .staging import current_files

        files = current_files()
        quoted_inputs = [shlex.quote(str(path)) for path in files.inputs]
        quoted_outputs = [shlex.quote(str(path)) for path in files.outputs]
        line = self.command.format(
            item=item,
            index=files.index,
            input=quoted_inputs[0] if quoted_inputs else "",
            inputs=" ".join(quoted_inputs),
            output=quoted_outputs[0] if quoted_outputs else "",
            outputs=" ".join(quoted_outputs),
        )
        out_path, err_path = files.directory / "stdout.txt", files.directory / "stderr.txt"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            exit_code = subprocess.run(
                line,
                shell=True,
                cwd=files.directory,
                stdout=out,
                stderr=err,
                check=False,
                preexec_fn=_die_with_parent,
            ).returncode
        stderr = _tail(err_path)
        if exit_code != 0:
            raise CommandError(
                f"the command exited with status {exit_code}: {line}\n"
                f"--- stderr (end) ---\n{stderr.rstrip()}",
                exit_code,
                stderr,
            )
        return CommandResult(
            item=item,
            exit_code=exit_code,
            outputs=list(files.output_urls),
            node=os.environ.get("CLOUDMAP_NODE_ID", ""),
            directory=str(files.directory),
            stdout=_tail(out_path),
            stderr=stderr,
        )


def _die_with_parent() -> None:
    """In the command's shell: be killed if the slot dies (a timeout ends the slot)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the command may outlive a slot ended by a timeout


def _tail(path: Any) -> str:
    with open(path, "rb") as stream:
        stream.seek(0, os.SEEK_END)
        stream.seek(max(0, stream.tell() - TAIL))
        return stream.read().decode(errors="replace")
