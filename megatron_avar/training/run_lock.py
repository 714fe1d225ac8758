"""One run per run directory: ``<out>/.avar.lock``, held by the logging rank for the whole run.

Two runs writing one ``out`` (a second submission of the same job, a requeue that overlaps a still-running
step) would interleave their checkpoints and metrics. The logging rank takes an exclusive ``flock`` on the lock
file before the run reads or writes anything in ``out``, and every rank learns the verdict together, so a
refused run stops on all ranks at once. The lock belongs to the open file: the kernel drops it when the holder
exits in any way (SIGKILL and a crashed node's job step included: a requeued job never finds a stale lock of its
own). The file records who holds it (host, pid, Slurm job, start time), which the refusal quotes.

File systems without ``flock`` support (some Lustre mounts) cannot enforce this; the run then says so once and
goes on without the lock.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["acquire_run_lock", "release_run_lock", "holding_run_lock", "LOCK_FILE"]

LOCK_FILE = ".avar.lock"

_held: dict[Path, IO[str]] = {}  # out (resolved) -> the open lock file of this process


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _describe_holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return "another process"
    job = f", Slurm job {record['slurm_job']}" if record.get("slurm_job") else ""
    return f"a run on {record.get('host')} (pid {record.get('pid')}{job}, started {record.get('started')})"


_RUN_CONFLICT = ("two runs writing one out would mix their checkpoints and metrics. Wait for that run to end (or "
                 "stop it), or choose another out")


def _try_lock(out: Path, conflict: str = _RUN_CONFLICT) -> str:
    """Take the lock for this process; '' on success, else why not (a sentence naming the holder, then
    ``conflict``: what two holders would do, and the way out)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    release_run_lock(out)  # a run of this process that ended by an exception left it taken: take it afresh
    path = key / LOCK_FILE
    handle = path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return f"{out} is in use by {_describe_holder(path)}: {conflict}"
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        handle.close()
        print(f"warning: the file system of {out} does not support flock ({os.strerror(error.errno)}): two runs "
              "started on this out would not be stopped from mixing their checkpoints", flush=True)
        return ""
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_holder_record()) + "\n")
    handle.flush()
    _held[key] = handle
    return ""


def acquire_run_lock(out: str | Path, *, is_logging_rank: bool, conflict: str = _RUN_CONFLICT) -> None:
    """Collective over the world (or local without one): the logging rank takes ``out``'s lock; ValueError on
    every rank when another process holds it (module docstring), naming the holder and then ``conflict`` (what
    two holders would do, and the way out; a training run's by default)."""
    import torch.distributed as dist

    try:
        verdict = [_try_lock(Path(out), conflict) if is_logging_rank else ""]
    except OSError as error:  # shared with the other ranks, which would otherwise wait in the broadcast
        verdict = [f"{out}: cannot create its lock file {LOCK_FILE} ({error}); check that out is writable"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ValueError(verdict[0])


@contextmanager
def holding_run_lock(out: str | Path, *, conflict: str) -> Iterator[None]:
    """One process (no ranks): ``out``'s lock held for the ``with`` block, released however it ends; ValueError
    as :func:`acquire_run_lock` when another process holds it."""
    acquire_run_lock(out, is_logging_rank=True, conflict=conflict)
    try:
        yield
    finally:
        release_run_lock(out)


def release_run_lock(out: str | Path) -> None:
    """Drop this process's lock on ``out`` (no-op when it holds none). The file stays: removing it could let
    two runs lock two different files of one name."""
    handle = _held.pop(Path(out).resolve(), None)
    if handle is not None:
        handle.close()
