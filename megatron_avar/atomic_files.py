"""Files that hold either their old content or their new content, never a torn mix, even after a node crash.

A write goes to a temporary file beside the target (a unique name, so concurrent writers of one file never share
it), is flushed to the disk (``fsync``), and is renamed over the target; the directory is then flushed too, so
the rename itself survives a power loss or a kernel panic, not only a killed process. A write that fails removes
its temporary file and leaves the target as it was. As with a plain ``open(path, "w")``: a new file gets the
process's umask (not the owner-only mode of ``tempfile``), a replaced file keeps its mode, and a symlink is
written through (its target is replaced, the link stays).

Every file this project publishes for a later run or a user to read (summaries, reports, trainer states, the
``latest`` pointer of checkpoints, caches, datasets) is written here; append-only logs (metrics.jsonl,
predictions) are not, since a torn last line of those is dropped on the next read.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replacing", "write_text", "write_bytes", "write_json", "json_text", "fsync_file", "fsync_directory",
           "fsync_tree", "remove_leftovers", "os_error_in", "sibling_folder", "remove_stale_siblings",
           "process_alive"]

# A directory's fsync is refused by some file systems (EINVAL on some network mounts, EBADF/EACCES on others):
# there the rename is as durable as the file system makes it, and the write must not fail for it.
_DIRECTORY_SYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.ENOTSUP,
                               getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk (it may have been written by anyone, through any handle)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(path: str | Path) -> None:
    """Flush ``path``'s entries (the names created, renamed or removed in it) to the disk, where the file
    system allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        if error.errno in _DIRECTORY_SYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in _DIRECTORY_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(descriptor)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and directory under ``root`` (and ``root``), deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_directory(folder)


def _temporary_pattern(path: Path) -> str:
    return f".{path.name}.*.tmp"


def remove_leftovers(path: str | Path) -> None:
    """Remove the temporary files that writes of ``path`` killed mid-way left beside it (never a result)."""
    path = Path(path)
    for leftover in path.parent.glob(_temporary_pattern(path)):
        leftover.unlink(missing_ok=True)


def _create_temporary(path: Path) -> Path:
    while True:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode: 0o666 & ~umask
        except FileExistsError:
            continue
        return temporary


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """``with replacing(path) as temporary:`` write the new content to ``temporary`` (an empty file in
    ``path``'s folder, which is created if missing); on leaving the block without an error it replaces ``path``
    durably (module docstring). On an error, or KeyboardInterrupt, ``path`` is untouched and ``temporary`` gone."""
    path = Path(os.path.realpath(path))  # through symlinks, as open() writes
    made = _make_folders(path.parent)
    temporary = _create_temporary(path)
    try:
        if path.exists():
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    for folder in made:  # each new folder's entry in its parent, deepest first: else a crash may lose the folder
        fsync_directory(folder.parent)


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and the folders above it that are missing; returns those it made, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
    return missing


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data``, atomically and durably."""
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8), atomically and durably."""
    write_bytes(path, text.encode("utf-8"))


def json_text(data, *, indent: int | None = 2, **dump_options) -> str:
    """``data`` as :func:`write_json` writes it (``indent``, a final newline; ``dump_options`` go to ``json.dumps``):
    for a JSON file published by other means (beside its figures: ``analysis.figures.publish``)."""
    return json.dumps(data, indent=indent, **dump_options) + "\n"


def write_json(path: str | Path, data, *, indent: int | None = 2, **dump_options) -> None:
    """Replace ``path`` by ``data`` as JSON (:func:`json_text`), atomically and durably."""
    write_text(path, json_text(data, indent=indent, **dump_options))


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind a failed write ``error`` (a full disk, a quota, EIO): itself, its cause or context, or
    one of the per-rank failures a torch.distributed.checkpoint CheckpointException (or megatron's wrapper)
    carries; ENOSPC for an error of a library that says "No space left on device" in words alone (safetensors);
    None when there is none."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        pending += [current.__cause__, current.__context__]
        pending += [e for e in getattr(current, "failures", {}).values() if isinstance(e, BaseException)]
        pending += [e for e in current.args if isinstance(e, BaseException)]
    if "No space left on device" in str(error):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def sibling_folder(path: str | Path, kind: str) -> Path:
    """``.<name>.<kind>-<host>-<pid>`` beside the folder ``path``: where this process writes a new ``path``
    (``kind`` "tmp") or sets the old one aside while it renames the new one into place ("old"). Not created here.
    Named by host and pid so that a later run can tell a dead process's folder (:func:`remove_stale_siblings`)."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def remove_stale_siblings(path: str | Path) -> None:
    """Clean up after processes of this host that died (SIGKILL, SIGTERM, a crash) while replacing the folder
    ``path``: their ``tmp`` folders are removed; an ``old`` folder is the previous ``path`` set aside just before
    the new one took its place: if the process died in between (``path`` missing) it is moved back, else removed."""
    path = Path(path)
    host = socket.gethostname()
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*-{glob.escape(host)}-*")):
        kind, _, pid = leftover.name[len(path.name) + 2:].partition(f"-{host}-")
        if kind not in ("tmp", "old") or not pid.isdigit() or process_alive(int(pid)):
            continue
        if kind == "old" and not path.exists():
            os.replace(leftover, path)
            print(f"restored {path} from {leftover.name}, left by a run that was killed while replacing it",
                  flush=True)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs: one of another user counts; with /proc, a zombie (exited or
    killed, not yet reaped by its parent) does not."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as proc_stat:
                return proc_stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
    return True
