"""Command-line tasks on the slot: run ``pool.run``'s command for one staged item.

The command runs in the item's working directory (its inputs already downloaded there by
:mod:`cloudmap.node.staged_call`), with stdout and stderr kept there as ``stdout.txt`` and
``stderr.txt``, as Batch keeps them for each task; the result carries their ends, the node
and the directory, so the whole files can be read back with ``pool.node(id).read_file(...)``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

from ..commands import TAIL, CommandResult
from ..errors import CommandError
from ..staging import current_files


@dataclass(frozen=True)
class CommandTask:
    """The function ``pool.run`` maps: run the command for the current staged item."""

    command: str

    def __call__(self, item: Any) -> CommandResult:
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
