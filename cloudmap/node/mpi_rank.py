"""One rank of a Python-mode MPI run: ``python -m cloudmap.node.mpi_rank CALL RESULT``.

Rank 0 reads the pickled call (function, args, kwargs, root_only) and broadcasts it, so that
only the primary node needs the file; every rank calls ``fn(COMM_WORLD, *args, **kwargs)``;
rank 0 gathers the return values (or keeps its own, with root_only) and writes them,
pickled, to RESULT. A rank whose function
raises writes a marked line with its pickled error to its stderr (which hydra forwards to
the primary node, whatever node the rank runs on) and exits with status 1, at once; the
primary then stops every rank (cloudmap.node.mpi_launch).
"""

from __future__ import annotations

import base64
import os
import sys
import traceback
from typing import Any

#: Starts the line of a rank's stderr that carries its pickled error.
ERROR_MARKER = "CLOUDMAP-MPI-ERROR "
#: Ends every rank's stderr, followed by the rank's exit status: the shell wrapper around
#: each rank writes it, and hydra forwards it to the primary node with the rest of the
#: rank's stderr, wherever the rank ran (see cloudmap.node.mpi_launch).
EXIT_MARKER = "CLOUDMAP-MPI-EXIT "


def main(call_path: str, result_path: str) -> int:
    import cloudpickle
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        if comm.rank == 0:
            with open(call_path, "rb") as file:
                blob = file.read()
        else:
            blob = None
        fn, args, kwargs, root_only = cloudpickle.loads(comm.bcast(blob, root=0))
        value = fn(comm, *args, **kwargs)
        if root_only:  # only rank 0's value is wanted: nothing to gather
            values = [cloudpickle.dumps(value)] if comm.rank == 0 else None
        else:
            values = comm.gather(cloudpickle.dumps(value), root=0)
    except BaseException as exc:
        _report(exc)
        # Not MPI_Abort: after an abort hydra ends the run at once, and the error line,
        # still on its way from this rank's node to the primary, can be lost. Exiting
        # leaves the other ranks waiting; the primary sees this rank's exit status, which
        # arrives after the error line, and stops them all.
        os._exit(1)
    if comm.rank == 0:
        assert values is not None
        with open(result_path + ".part", "wb") as file:
            file.write(cloudpickle.dumps(values))
        os.replace(result_path + ".part", result_path)
    return 0


def _report(exc: BaseException) -> None:
    import cloudpickle

    text = traceback.format_exc()
    try:
        blob = cloudpickle.dumps(exc)
    except Exception:
        blob = cloudpickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    record: Any = (blob, text)
    line = base64.b64encode(cloudpickle.dumps(record)).decode()
    sys.stderr.write(text)
    sys.stderr.write(f"\n{ERROR_MARKER}{line}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
