"""The child side of :func:`megatron_avar.local_ranks.run_on_ranks`: what one rank does, start to exit.

This module is also the forkserver's preload (see ``launcher.py`` for why a forkserver): importing
it imports torch and megatron-core once in the server, so every rank forked from it starts with them
already loaded. Nothing here may start threads or run torch ops at import time: the server must stay
single-threaded for its forks to be safe.

Protocol with the parent, over one ``Connection`` per rank: exactly one message, either
``("ok", pickled_result)`` or ``("error", exception_type_name, traceback_text, time.monotonic(),
str(exception))`` (the system-wide monotonic time of the failure, so the parent can tell the first failure
from the errors it caused in ranks blocked on a collective with it). A rank that exits
without a message (``os._exit``, a signal, a crash in C++) is detected by the parent through the
process sentinel.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from megatron_avar import platform
from megatron_avar.atomic_files import process_alive
from megatron_avar.local_ranks.launcher import STACK_DUMP_SIGNAL

# megatron-core's import-time warnings (Transformer Engine / Apex absent) are filtered by megatron_avar.console,
# installed when the package was imported above; any other warning still shows in the rank logs.
try:
    import megatron.core  # noqa: F401  (preloaded for the ranks; the import costs ~4-5 s)
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
except ImportError:  # the harness itself does not need megatron
    pass


def rank_main(
    conn,
    rank: int,
    world_size: int,
    store_port: int,
    environ: dict[str, str],
    sys_path: list[str],
    cwd: str,
    payload: bytes,
    log_path: str | None,
    timeout_s: float | None,
    caller: int,
) -> None:
    """Run one rank: environment, process group, ``fn(*args, **kwargs)``, teardown, reply; the rank dies with
    ``caller`` (the pid of the process that started it: :func:`_die_with`).

    The rank's stdout/stderr (fds 1 and 2, so C++ output too) go to ``log_path``, which the parent replays
    (None: they stay where they are). ``environ``/``sys_path``/``cwd`` are the caller's at call time: the
    forkserver captured its own when it started, which may be stale.
    """
    # A process group of its own, so that what the rank starts dies with it, spawned processes too (fork + exec:
    # megatron's async checkpoint writer starts a Manager process; the fork hook below does not reach those):
    # the launcher and _die_with kill the group. (The launcher, not the terminal, stops ranks on Ctrl-C.)
    os.setpgrp()
    log = open(log_path, "w", buffering=1) if log_path is not None else sys.stderr
    sys.stdout.flush()
    sys.stderr.flush()
    if log_path is not None:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    faulthandler.register(STACK_DUMP_SIGNAL, file=log, all_threads=True)
    platform.tie_forked_children_to_this_process()
    threading.Thread(target=_die_with, args=(caller,), name="die-with-caller", daemon=True).start()
    try:
        os.environ.clear()
        os.environ.update(environ)
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(store_port),
        )
        sys.path[:] = sys_path + [p for p in sys.path if p not in sys_path]
        os.chdir(cwd)
        # The ranks share the machine's cores; more threads than cores makes every collective wait on
        # the slowest, oversubscribed rank.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
        fn, args, kwargs = pickle.loads(payload)
        _init_process_group(rank, world_size, store_port, timeout_s)
        result = fn(*args, **kwargs)
        _teardown()
        message = ("ok", pickle.dumps(result))
    except BaseException as exc:  # noqa: BLE001 - every failure, SystemExit included, goes to the parent
        message = ("error", type(exc).__qualname__, traceback.format_exc(), time.monotonic(), str(exc))
    sys.stdout.flush()  # before replying: the parent may kill the rank any time after the reply
    sys.stderr.flush()
    log.flush()
    conn.send(message)
    conn.close()


def _die_with(caller: int, poll_s: float = 1.0) -> None:
    """Thread: SIGKILL this rank and its process group (what it started) once ``caller`` is gone. A caller killed
    by a signal (`avar convert` stopped with SIGTERM, the OOM killer) runs no cleanup, and its ranks, children of
    the forkserver (which each rank keeps alive) or spawned, would work on for as long as their task takes."""
    while process_alive(caller):
        time.sleep(poll_s)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _init_process_group(rank: int, world_size: int, store_port: int, timeout_s: float | None) -> None:
    # The parent owns the TCPStore server (port chosen by the OS while binding, so no race with other
    # runs for a "free" port); ranks connect as clients. A rank that finishes early therefore cannot
    # take the store down under the others, as rank 0 hosting it would.
    platform.bind_device(int(os.environ["LOCAL_RANK"]))
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    # (dist.TCPStore is public torch API that torch.distributed's __init__ re-exports without an __all__ entry)
    store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
        "127.0.0.1", store_port, world_size, is_master=False, timeout=timeout or default_pg_timeout)
    dist.init_process_group(
        platform.distributed_backend(),
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,  # a rank stuck in a collective errors out even if the parent vanished (None: torch's)
    )


def _teardown() -> None:
    """Destroy megatron's parallel state (if the test initialised it) and the default process group."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
