"""One run per run directory: ``<out>/.avar.lock``, held by the logging rank for the whole run.

Two runs writing one ``out`` (a second submission of the same job, a requeue that overlaps a still-running
step) would interleave their checkpoints and metrics. The logging rank takes an exclusive ``flock`` on the lock
file before the run reads or writes anything in ``out``, and every rank learns the verdict together, so a
refused run stops on all ranks at once. The lock belongs to the open file: the kernel drops it when the holder
exits in any way (SIGKILL and a crashed node's job step included: a requeued job never finds a stale lock of its
own). The file records who holds it (host, pid, Slurm job, start time), which the refusal quotes.

A run that fails before it wrote anything into an ``out`` it created (a model that does not load, a setting
refused after the lock was taken) leaves no folder behind: :func:`release_run_lock` with ``failed`` removes the
lock file and the folders this process made for it, and only while ``out`` holds nothing else. The lock file is
removed while still locked, and a taker checks after its ``flock`` that the file it locked is still the one the
path names (else it takes the lock afresh), so a run that opened the removed file never holds a lock no one
else can see.

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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["acquire_run_lock", "release_run_lock", "holding_run_lock", "LOCK_FILE"]

LOCK_FILE = ".avar.lock"


@dataclass
class _Held:
    """The lock of one ``out`` taken by this process: the open lock file (None where the file system has no
    ``flock``), and the folders the taker made, ``out`` first (then the missing folders above it)."""

    handle: IO[str] | None
    made: list[Path]


_held: dict[Path, _Held] = {}  # out (resolved) -> the lock of this process


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


def _make_folders(out: Path) -> list[Path]:
    """Make ``out`` and the folders above it that are missing; returns those this call made, ``out`` first (a
    folder another process made meanwhile is not counted). A folder removed meanwhile by another run's cleanup
    (module docstring: a failed run removes the empty folders it made) is made again."""
    made: set[Path] = set()
    while True:
        missing, folder = [], out
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        try:
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                except FileExistsError:
                    continue
                made.add(folder)
        except FileNotFoundError as error:
            if not folder.parent.is_dir():  # a folder above was removed after the walk: walk again
                continue
            raise _cannot_make(folder, error) from None  # (/proc refuses a new folder this way)
        except OSError as error:  # not writable, a read-only file system, a file in the way
            raise _cannot_make(folder, error) from None
        return sorted(made, key=lambda folder: len(folder.parts), reverse=True)


def _cannot_make(folder: Path, error: OSError) -> ValueError:
    return ValueError(f"cannot make the folder {folder} ({error.strerror or error}): give an output folder on a file "
                      "system this user can write")


def _try_lock(out: Path, conflict: str = _RUN_CONFLICT) -> str:
    """Take the lock for this process; '' on success, else why not (a sentence naming the holder, then
    ``conflict``: what two holders would do, and the way out)."""
    import fcntl

    release_run_lock(out)  # a run of this process that ended by an exception left it taken: take it afresh
    key = out.resolve()
    made = _make_folders(key)
    path = key / LOCK_FILE
    while True:
        try:
            handle = path.open("a+")
        except FileNotFoundError:  # a failed run removed its empty out (module docstring) since: make it again
            made = sorted({*made, *_make_folders(key)}, key=lambda folder: len(folder.parts), reverse=True)
            continue
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
            _held[key] = _Held(handle=None, made=made)
            return ""
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(handle.fileno()), current):
            break
        handle.close()  # the file locked was removed by the run that held it: lock the one the path names now
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_holder_record()) + "\n")
    handle.flush()
    _held[key] = _Held(handle=handle, made=made)
    return ""


def acquire_run_lock(out: str | Path, *, is_logging_rank: bool, conflict: str = _RUN_CONFLICT) -> None:
    """Collective over the world (or local without one): the logging rank takes ``out``'s lock; ValueError on
    every rank when another process holds it (module docstring), naming the holder and then ``conflict`` (what
    two holders would do, and the way out; a training run's by default)."""
    import torch.distributed as dist

    try:
        verdict = [_try_lock(Path(out), conflict) if is_logging_rank else ""]
    except OSError as error:  # shared with the other ranks, which would otherwise wait in the broadcast
        verdict = [f"{out}: cannot create its lock file {LOCK_FILE} ({error}); "
                   + ("it is a file, not a folder: choose another out" if Path(out).is_file() else
                      "check that out is a folder you can write")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ValueError(verdict[0])


@contextmanager
def holding_run_lock(out: str | Path, *, conflict: str) -> Iterator[None]:
    """One process (no ranks): ``out``'s lock held for the ``with`` block, released however it ends (a block that
    raises releases it as a failed run: :func:`release_run_lock`); ValueError as :func:`acquire_run_lock` when
    another process holds it."""
    acquire_run_lock(out, is_logging_rank=True, conflict=conflict)
    failed = True
    try:
        yield
        failed = False
    finally:
        release_run_lock(out, failed=failed)


def release_run_lock(out: str | Path, *, failed: bool = False) -> None:
    """Drop this process's lock on ``out`` (no-op when it holds none); the lock file stays for the next run.
    ``failed``: the run ends on an error. Then, when this process made ``out`` for the lock and ``out`` holds
    nothing but the lock file, the lock file and the folders made for it are removed (``out``, then the missing
    folders above it that were made with it, each only while empty), so a failed first run leaves nothing behind.
    A folder that existed before, or that holds anything else, keeps everything."""
    key = Path(out).resolve()
    held = _held.pop(key, None)
    if held is None:
        return
    remove = failed and held.made[:1] == [key] and _holds_only_the_lock(key)
    if remove:
        with suppress(FileNotFoundError):
            (key / LOCK_FILE).unlink()  # while still locked (module docstring)
    if held.handle is not None:
        held.handle.close()
    if remove:
        for folder in held.made:  # out first, then up; rmdir refuses a folder that is not empty
            try:
                folder.rmdir()
            except OSError:
                break


def _holds_only_the_lock(out: Path) -> bool:
    try:
        return [entry.name for entry in out.iterdir()] == [LOCK_FILE]
    except OSError:
        return False
