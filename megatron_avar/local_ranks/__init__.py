"""Local torch.distributed ranks started by this process: the package's one launcher (:mod:`.launcher`, the
parent side; :mod:`._rank`, what each rank does). Commands use :func:`launch`; tests use :func:`run_on_ranks`
(also ``megatron_avar.testing.run_on_ranks``). Ranks are forked from a forkserver that preloaded torch and
megatron-core on the CPU, and spawned where CUDA is present (a fork of a process with CUDA initialised cannot
use CUDA)."""

from megatron_avar.local_ranks.launcher import (
    MultiprocessError,
    RankFailedError,
    RanksTimedOutError,
    launch,
    run_on_ranks,
)

__all__ = ["launch", "run_on_ranks", "MultiprocessError", "RankFailedError", "RanksTimedOutError"]
