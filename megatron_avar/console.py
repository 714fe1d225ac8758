"""What reaches the console: the warnings megatron-core and torch give on every run are filtered, and what a user
can act on is said once.

megatron-core 0.16.1 warns, in every process and on every rank, about each optional library it does not find
("Transformer Engine and Apex are not installed. Falling back to ...", four times at import; "Apex is not
installed. Falling back to Torch Norm", twice), about its own defaults ("full scope is deprecated": the default
``cuda_graph_scope`` of ``TransformerConfig``), and, through torch, about the collectives and checkpoint entry
points it calls. None of these is something a user of this package can act on: on a CPU the libraries cannot be
installed, Apex is superseded by Transformer Engine, and megatron-core is pinned. Where a missing library does
cost something (Transformer Engine on a CUDA machine), :func:`megatron_avar.platform.prepare_megatron` says so in
one line through :func:`note_once`.

:func:`install_warning_filters` runs when the ``megatron_avar`` package is imported, before any of its modules
imports megatron-core, so every process that imports the package is quiet: the command itself, the ranks that
torchrun or srun start, the ranks of :func:`megatron_avar.testing.run_on_ranks`, and DataLoader workers (forked
ones inherit the filters, spawned ones import the package again). Each filter names the category, the start of
the message and the module that warns; no category or module is silenced as a whole, so every other warning
still shows. ``MEGATRON_AVAR_VERBOSE_WARNINGS=1`` installs none of them (for debugging).

This module imports only the standard library: ``import megatron_avar`` must stay fast (``avar --help``).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

__all__ = ["VERBOSE_WARNINGS_ENV", "ExpectedWarning", "EXPECTED_WARNINGS", "EXPECTED_WARNINGS_ON_CPU",
           "install_warning_filters", "install_cpu_warning_filters", "is_logging_process", "note_once"]

VERBOSE_WARNINGS_ENV = "MEGATRON_AVAR_VERBOSE_WARNINGS"


@dataclass(frozen=True)
class ExpectedWarning:
    """One warning that is expected and not actionable. ``message``: a regular expression matched (case-blind)
    at the start of the warning's text; ``module``: one matched against the whole name of the module the warning
    is attributed to (the frame ``warnings.warn`` names, after its ``stacklevel``); ``why``: why it is expected."""

    category: type[Warning]
    message: str
    module: str
    why: str


EXPECTED_WARNINGS = (
    ExpectedWarning(UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core\..*",
                    "megatron-core's import-time fallbacks; a CUDA machine without Transformer Engine gets one line "
                    "from platform.prepare_megatron instead"),
    ExpectedWarning(UserWarning, r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\..*",
                    "Apex is never installed: Transformer Engine's norms are used on GPUs, torch's on CPUs"),
    ExpectedWarning(UserWarning, r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config",
                    "TransformerConfig's own default cuda_graph_scope='full' triggers it; CUDA graphs are not used"),
    ExpectedWarning(UserWarning, r"If you are using transformer_engine as the transformer implementation, the "
                                 r"core_attn is from transformer_engine",
                    r"megatron\.core\.transformer\.transformer_config",
                    "train.recompute=selective recomputes core_attn, which here is this project's own attention "
                    "(torch SDPA or the role kernels), never Transformer Engine's fused one"),
    ExpectedWarning(FutureWarning,
                    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                    r"torch\.distributed\.c10d_logger",
                    "megatron-core's distributed optimizer calls them; megatron-core is pinned (setup.py)"),
    ExpectedWarning(FutureWarning, r"`load_state_dict` is deprecated and will be removed",
                    r"megatron\.core\.dist_checkpointing\..*",
                    "megatron-core's torch_dist checkpoint loader calls torch's old entry point; megatron-core is "
                    "pinned"),
    ExpectedWarning(FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
                    r"torch\.distributed\..*|megatron_avar\.platform",
                    "torch's checkpoint planner, reading megatron-core's ShardedTensor checkpoints (under platform's "
                    "CPU device mode the warning names platform)"),
    ExpectedWarning(UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
                    r"megatron\.core\.optimizer\..*|megatron_avar\.platform",
                    "megatron's distributed optimizer zeroes the gradients of its fp32 shards, which are views of the "
                    "parameters; on CPU the access passes through platform's device mode, which is then named"),
)

# Expected only where CUDA is absent: on a GPU they are advice worth reading.
EXPECTED_WARNINGS_ON_CPU = (
    ExpectedWarning(UserWarning, r"When using (async grad allreduce|sequence parallelism) it is recommended to set "
                                 r"the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
                    r"megatron\.core\.tensor_parallel\.layers",
                    "a CUDA stream setting (slurm/lib/launch.sh sets it on clusters); meaningless on a CPU"),
)


def _verbose() -> bool:
    return os.environ.get(VERBOSE_WARNINGS_ENV, "") not in ("", "0")


def _install(expected: tuple[ExpectedWarning, ...]) -> None:
    if _verbose():
        return
    for item in expected:
        # filterwarnings matches `module` at the start of the name only: \Z makes it the whole name.
        warnings.filterwarnings("ignore", message=item.message, category=item.category, module=rf"(?:{item.module})\Z")


def install_warning_filters() -> None:
    """Ignore :data:`EXPECTED_WARNINGS` in this process (nothing with ``MEGATRON_AVAR_VERBOSE_WARNINGS=1``).
    Idempotent: ``warnings.filterwarnings`` does not add a filter that is already there."""
    _install(EXPECTED_WARNINGS)


def install_cpu_warning_filters() -> None:
    """Also ignore :data:`EXPECTED_WARNINGS_ON_CPU`; called by ``platform`` when megatron-core runs on a CPU."""
    _install(EXPECTED_WARNINGS_ON_CPU)


def is_logging_process() -> bool:
    """Whether this process is the one that speaks for the job: global rank 0 as torchrun (RANK) or srun
    (SLURM_PROCID) numbers it, or a process started by neither."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").strip():
            return os.environ[name].strip() == "0"
    return True


_noted: set[str] = set()


def note_once(message: str) -> None:
    """Print ``avar: <message>`` to stderr once per process, on the logging process only (see
    :func:`is_logging_process`): for what the user can act on, e.g. a missing library that makes a run slower."""
    if message in _noted or not is_logging_process():
        return
    _noted.add(message)
    print(f"avar: {message}", file=sys.stderr, flush=True)
