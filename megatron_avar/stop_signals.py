"""The signals that stop a training run after its current step: SIGTERM (Slurm's preemption, `scancel`) and SIGUSR1
(the time-limit warning the launch scripts ask for with ``--signal=B:USR1@S``).

Python's default for both is to die at once. `avar sft` / `avar grpo` hold them from the first line of the command
(:func:`held`, entered by ``cli.main`` before anything is imported), not only once the trainer has imported torch and
megatron-core: that takes seconds to minutes on a busy shared file system, and a rank killed by a signal in that
window wrote no checkpoint (found in review: two ranks still died of a USR1 24 s after their start). The trainer's
``training.checkpointing.PreemptionFlag`` takes over, with what arrived before it (:func:`take`). Standard library
only.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["STOP_SIGNALS", "held", "take"]

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")

_received: list[str] = []


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Within the block, the stop signals are recorded instead of killing the process (from the main thread; in
    another, signals cannot be handled and nothing changes); what was recorded before is forgotten. The handlers
    before the block are put back after it (a caller that runs a command in-process keeps its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {name: signal.signal(getattr(signal, name), _record) for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def take() -> str | None:
    """The first stop signal recorded since :func:`held` began, or None; forgotten once taken."""
    first = _received[0] if _received else None
    _received.clear()
    return first
