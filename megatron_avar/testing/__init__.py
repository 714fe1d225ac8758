"""Helpers for tests: run a function on several gloo/NCCL ranks (the package's launcher,
``megatron_avar.local_ranks``), build megatron modules with identical logical weights at any TP/PP layout.

    from megatron_avar.testing import run_on_ranks, RankFailedError, RanksTimedOutError
    from megatron_avar.testing import fill_logical_weights, gather_full_tensors, global_named_parameters
"""

from megatron_avar.local_ranks import (
    MultiprocessError,
    RankFailedError,
    RanksTimedOutError,
    run_on_ranks,
)
from megatron_avar.testing.weights import (
    fill_logical_weights,
    gather_full_tensors,
    global_named_parameters,
    logical_tensor,
)

__all__ = [
    "run_on_ranks",
    "MultiprocessError",
    "RankFailedError",
    "RanksTimedOutError",
    "fill_logical_weights",
    "gather_full_tensors",
    "global_named_parameters",
    "logical_tensor",
]
