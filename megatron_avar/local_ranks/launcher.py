"""Run a function on N local torch.distributed ranks (gloo on CPU, NCCL on GPUs) and collect per-rank results:
the one launcher of the package, used by the commands that start their own ranks (`avar convert`, `avar vas`
on a megatron checkpoint: :func:`launch`) and by the tests (:func:`run_on_ranks`, re-exported by
``megatron_avar.testing``).

    results = run_on_ranks(check_tp2, 2, seq_len, timeout_s=120)   # [rank 0 result, rank 1 result]
    launch(hf_to_mcore_rank, tp * pp, hf_dir, out_dir, ...)        # live output, no deadline, ValueError kept

``fn`` runs on every rank with the default process group initialised; megatron's parallel state, if
``fn`` initialises it, is destroyed afterwards, as is the process group. Failures surface promptly:

* a rank that raises (or dies) -> the other ranks, which may be blocked in a collective waiting for it,
  are killed at once and :class:`RankFailedError` carries the failing rank's number and traceback;
* nothing finished after ``timeout_s`` -> each unfinished rank's Python stacks are dumped into its log,
  all ranks are killed, and :class:`RanksTimedOutError` names the unfinished ranks and shows the dumps.

Ranks are not daemonic: megatron's torch_dist checkpoint writer starts worker processes of its own, which a
daemonic process may not. Every rank ties the children it forks to itself
(``platform.tie_forked_children_to_this_process``) and the launcher kills the ranks it leaves behind.

Start method: a forkserver with torch and megatron-core preloaded. Measured on the 2-core CPU machine
(torch 2.13 CPU, megatron-core 0.16.1; `import megatron.core` alone takes 4.3 s), 2 ranks, for a
trivial collective / for the 3-layout GPT check of tests/test_megatron_parallel.py:

* ``spawn``: 7.4-7.9 s / 8.7-10.0 s on every call: each rank re-imports torch + megatron, both ranks
  at once on 2 cores.
* ``fork`` of a caller that has megatron imported: 0.1-0.2 s / 1.6-1.7 s, but unreliable: once the
  caller has run a multi-threaded torch op, a rank's first multi-threaded op deadlocks (reproduced:
  1 rank with 2 threads hangs in its first matmul; the OpenMP (libgomp) pool does not survive fork).
  It only survives here because 2 ranks on 2 cores get 1 thread each. The caller is pytest after
  arbitrary other tests, so other threads holding locks (a TCPStore server, tokenizer pools, CUDA on
  GPU machines) make fork unsafe as well.
* ``forkserver`` preloading ``_rank`` (torch + megatron-core): 4.3 s for the first call of a process
  (server start), then 0.2 s / 1.7 s. The server is a fresh interpreter that only imported modules
  and never ran a parallel region, so its forks are safe (tests/test_multiprocess.py runs a
  multi-threaded matmul in a rank to keep it so).

``fn``, its arguments and its return value travel by pickle: ``fn`` must be a module-level function of
an importable module (a test module is fine), not a lambda or closure. As with any non-fork start
method, each rank imports the caller's ``__main__`` script (never pytest's), so a script calling
``run_on_ranks`` needs the ``if __name__ == "__main__":`` guard. Environment variables read when
torch/megatron are imported (OMP_NUM_THREADS, TRITON_INTERPRET) take the values they had when the
forkserver started, i.e. at the first call.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

__all__ = ["launch", "run_on_ranks", "MultiprocessError", "RankFailedError", "RanksTimedOutError"]

_PRELOAD = ["megatron_avar.local_ranks._rank"]
# Sent to a rank before it is killed on timeout: its faulthandler dumps every thread's Python stack.
STACK_DUMP_SIGNAL = signal.SIGUSR1
_KILL_GRACE_S = 2.0  # SIGTERM first, SIGKILL after this
_STACK_DUMP_WAIT_S = 0.5  # faulthandler writes from its C signal handler: milliseconds
_LOG_TAIL_LINES = 80
_FIRST_FAILURE_WAIT_S = 0.3  # how long a failure waits for other ranks' reports (see _first_failure)


class MultiprocessError(RuntimeError):
    """Base of the errors :func:`run_on_ranks` raises for a failed run."""


class RankFailedError(MultiprocessError):
    """A rank raised or exited without a result.

    Attributes: ``rank``, ``exception_type`` (qualified name, or None if the rank died without raising),
    ``exception_message`` (``str()`` of the exception, or None), ``rank_traceback`` (the formatted traceback,
    or the tail of the rank's output if it died).
    """

    def __init__(self, message: str, rank: int, exception_type: str | None, rank_traceback: str,
                 exception_message: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.rank_traceback = rank_traceback


class RanksTimedOutError(MultiprocessError):
    """Some ranks did not finish within ``timeout_s``. Attribute ``unfinished_ranks``: sorted list."""

    def __init__(self, message: str, unfinished_ranks: list[int]):
        super().__init__(message)
        self.unfinished_ranks = unfinished_ranks


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float | None = 300.0,
    env: Mapping[str, str] | None = None,
    capture_output: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` ranks and return the results, index = rank.

    Each rank sees the caller's environment plus ``env`` plus RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (all ranks are local), and ``torch.distributed`` is
    initialised with ``platform.distributed_backend()`` before ``fn`` runs. Each rank gets
    ``cores // world_size`` torch threads. ``capture_output``: what ranks print is written to this process's
    stderr once they finish (so pytest shows it with a failing test); False lets it through as it comes (to
    where this process's output went when the first ranks of the process started: the forkserver's). ``timeout_s``
    bounds the run from the moment all ranks are started (the forkserver's one-time start is not counted); it
    is also the process group's collective timeout. None: no deadline, torch's default collective timeout.

    Raises ValueError for bad arguments or an unpicklable ``fn``/arguments, :class:`RankFailedError`,
    :class:`RanksTimedOutError`.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds or None (no deadline), got {timeout_s!r}")
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError(f"env must map str to str (os.environ values), got {dict(env)!r}")
    try:
        payload = pickle.dumps((fn, args, kwargs))
    except Exception as exc:
        raise ValueError(
            f"run_on_ranks sends fn and its arguments to the ranks by pickle, which failed ({exc}); "
            "pass a module-level function of an importable module (not a lambda, closure or local "
            "function) and picklable arguments"
        ) from exc

    environ = {**os.environ, **(env or {})}
    # The OS picks the port while binding the server here, so concurrent runs cannot collide.
    # (dist.TCPStore is public torch API that torch.distributed's __init__ re-exports without an __all__ entry)
    store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
        "127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    context = _forkserver_context()
    with tempfile.TemporaryDirectory(prefix="run_on_ranks_") as log_dir:
        log_paths = [os.path.join(log_dir, f"rank{r}.log") if capture_output else None for r in range(world_size)]
        ranks = []
        results = None
        try:
            for rank in range(world_size):
                parent_conn, child_conn = context.Pipe(duplex=False)
                process = context.Process(
                    target=_rank_entry,
                    name=f"run_on_ranks-rank{rank}",
                    args=(child_conn, rank, world_size, store.port, environ, list(sys.path),
                          os.getcwd(), payload, log_paths[rank], timeout_s, os.getpid()),
                    daemon=False,  # megatron's checkpoint writer forks workers (module docstring)
                )
                process.start()
                child_conn.close()  # so that a dead rank reads as EOF here
                ranks.append(_Rank(rank, process, parent_conn))
            # The clock starts once every rank is forked, so the forkserver's one-time start (~5 s,
            # the first call of a process) is not charged to the first caller's timeout.
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            results = _collect(ranks, deadline, log_paths)
            return results
        finally:
            # After success the ranks are exiting on their own; after a failure nobody waits for them.
            _stop(ranks, exit_grace_s=_KILL_GRACE_S if results is not None else 0.0)
            _replay_logs(log_paths)
            del store


def launch(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """:func:`run_on_ranks` as a command starts its ranks (`avar convert`, `avar vas` on a megatron checkpoint):
    their output shown as it comes (progress bars), no deadline (a 72B conversion takes hours), and a rank's
    ValueError (bad input the rank found, e.g. a checkpoint that does not match its config) raised here as a
    ValueError with the rank's message, which the CLI reports in one line. On a machine with GPUs each rank takes
    one (NCCL): more ranks than GPUs is refused before any starts, naming the CPU route."""
    _check_gpus_for(world_size)
    try:
        return run_on_ranks(fn, world_size, *args, timeout_s=None, capture_output=False)
    except RankFailedError as error:
        if error.exception_type == "ValueError" and error.exception_message is not None:
            raise ValueError(error.exception_message) from None
        raise


def _check_gpus_for(world_size: int) -> None:
    """ValueError when this machine has GPUs but fewer than ``world_size`` (found in review: `avar convert --tp 8
    --pp 4` on an 8-GPU node failed in its ranks with a message about srun's GPU binding)."""
    from megatron_avar import platform

    if not platform.cuda_available():
        return
    import torch

    visible = torch.cuda.device_count()
    if world_size > visible:
        raise ValueError(f"this command starts {world_size} ranks (tensor x pipeline parallel sizes), one per GPU, "
                         f"but this machine has {visible} GPU(s): run it where {world_size} GPUs are visible, or on "
                         "the CPUs with CUDA_VISIBLE_DEVICES= (gloo; a conversion needs no GPU, only host memory "
                         "for the weights)")


def _rank_entry(*args) -> None:
    # Imported here, not at the top: the forkserver already holds `_rank` (and megatron), while the
    # caller should not pay megatron's import just to start ranks.
    from megatron_avar.local_ranks._rank import rank_main

    rank_main(*args)


class _Rank:
    def __init__(self, rank: int, process, conn):
        self.rank, self.process, self.conn = rank, process, conn
        self.message: tuple | None = None


def _collect(ranks: list[_Rank], deadline: float | None, log_paths: list[str | None]) -> list[Any]:
    pending = {r.rank: r for r in ranks}
    while pending:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise _timeout_error(sorted(pending), len(ranks), log_paths, ranks)
        waitables = {}
        for r in pending.values():
            waitables[r.conn] = r
            waitables[r.process.sentinel] = r
        ready = multiprocessing.connection.wait(list(waitables), timeout=remaining)
        for r in {id(waitables[obj]): waitables[obj] for obj in ready}.values():
            _receive(r)
            if r.message is None and r.process.is_alive():
                continue  # spurious wake-up: nothing readable yet
            del pending[r.rank]
            if r.message is None or r.message[0] == "error":
                raise _failure_error(_first_failure(r, pending.values()), len(ranks), log_paths)
    results = []
    for r in ranks:
        assert r.message is not None  # every rank reported success: a failure or a silent exit raised above
        results.append(pickle.loads(r.message[1]))
    return results


def _first_failure(failed: _Rank, others) -> _Rank:
    """The rank that failed first. When one rank raises, ranks blocked with it in a collective fail
    moments later with a connection error; their report can reach the parent first. Wait briefly for
    the others' reports and pick the earliest failure time. A rank that died without a report (a crash,
    no time stamp) is taken as the cause: ranks that report errors after a peer vanished are the effect."""
    if failed.message is None:
        return failed
    time.sleep(_FIRST_FAILURE_WAIT_S)
    candidates = [(failed.message[3], failed)]  # (failure time, rank)
    for r in others:
        _receive(r)
        if r.message is None and not r.process.is_alive():
            return r
        if r.message is not None and r.message[0] == "error":
            candidates.append((r.message[3], r))
    return min(candidates, key=lambda candidate: candidate[0])[1]


def _receive(r: _Rank) -> None:
    """Read the rank's one message if it is there; leave ``message`` None if it exited without one."""
    try:
        if r.conn.poll():
            r.message = r.conn.recv()
    except (EOFError, OSError):
        r.process.join(timeout=_KILL_GRACE_S)


def _failure_error(r: _Rank, world_size: int, log_paths: list[str | None]) -> RankFailedError:
    log_path = log_paths[r.rank]
    if r.message is not None:
        _, exception_type, rank_traceback, _, exception_message = r.message
        return RankFailedError(
            f"rank {r.rank} of {world_size} raised {exception_type}; the other ranks were killed.\n"
            f"--- traceback of rank {r.rank} ---\n{rank_traceback}",
            r.rank, exception_type, rank_traceback, exception_message,
        )
    r.process.join(timeout=_KILL_GRACE_S)
    tail = _tail(log_path)
    return RankFailedError(
        f"rank {r.rank} of {world_size} exited without a result (exit code {r.process.exitcode}); "
        f"the other ranks were killed.\n--- last output of rank {r.rank} ---\n{tail}",
        r.rank, None, tail,
    )


def _timeout_error(unfinished: list[int], world_size: int, log_paths: list[str | None], ranks) -> RanksTimedOutError:
    for rank in unfinished:
        _signal(ranks[rank].process, STACK_DUMP_SIGNAL, group=False)
    time.sleep(_STACK_DUMP_WAIT_S)  # let faulthandler write the stacks before the ranks are killed
    finished = sorted(set(range(world_size)) - set(unfinished))
    dumps = "\n".join(f"--- last output of rank {rank} (stacks at timeout) ---\n{_tail(log_paths[rank])}"
                      for rank in unfinished)
    return RanksTimedOutError(
        f"ranks {unfinished} of {world_size} did not finish within the timeout (finished: {finished}); "
        f"all ranks were killed.\n{dumps}",
        unfinished,
    )


def _stop(ranks: list[_Rank], exit_grace_s: float) -> None:
    """Let ranks exit for ``exit_grace_s``, then terminate (and finally kill) the rest; reap all."""
    deadline = time.monotonic() + exit_grace_s
    for r in ranks:
        r.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for r in ranks:
        if r.process.is_alive():
            _signal(r.process, signal.SIGTERM)
    deadline = time.monotonic() + _KILL_GRACE_S
    for r in ranks:
        r.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if r.process.is_alive():
            _signal(r.process, signal.SIGKILL)
            r.process.join()
        _kill_leftovers(r.process)
        r.conn.close()


def _signal(process, signum: int, *, group: bool = True) -> None:
    """Send ``signum`` to a live rank: to its process group (the rank and what it started: each rank leads its
    own), or with ``group=False`` (or before the rank has made its group) to the rank alone."""
    if process.pid is None:  # never started
        return
    try:
        if group and _leads_group(process.pid):
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)
    except ProcessLookupError:  # already gone
        pass


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _kill_leftovers(process) -> None:
    """SIGKILL what a rank that has exited (and been reaped) left running in its process group. Never signals the
    pid itself: once reaped it may be another process's."""
    if process.pid is not None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # nothing left (or the group was never made)
            pass


def _tail(path: str | None) -> str:
    if path is None:
        return "(the rank's output was not captured: it is above)"
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-_LOG_TAIL_LINES:])
    except FileNotFoundError:
        return "(the rank wrote no output)"


def _replay_logs(log_paths: list[str | None]) -> None:
    for rank, path in enumerate(log_paths):
        if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, errors="replace") as f:
                sys.stderr.write(f"----- output of rank {rank} -----\n{f.read()}")


_context = None


def _forkserver_context():
    """How ranks start: on the CPU, forked from a forkserver that preloaded torch and megatron-core (set
    before its server first starts, once per process); with CUDA, spawned. Importing megatron-core
    initialises CUDA, and a process forked from one with CUDA initialised cannot use CUDA."""
    global _context
    if _context is None:
        from megatron_avar import platform

        if platform.cuda_available():
            _context = multiprocessing.get_context("spawn")
        else:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(_PRELOAD)
    return _context
