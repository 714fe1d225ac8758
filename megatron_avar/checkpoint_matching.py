"""How a megatron checkpoint's entries must match the model that loads it: exactly, except Transformer Engine's
``_extra_state`` entries.

Transformer Engine's modules add one ``_extra_state`` entry each (FP8 scaling metadata, empty without FP8, which
no run here uses); megatron's local modules have them only for their linears, under the same names, so TE's norms'
entries are on one side only. Allowing those alone lets a checkpoint written on a machine with Transformer Engine
resume, export and verify on one without it, and the reverse. The checkpoint's entries are never loaded (they
could run code: see ``load_module_state``). Used by training resumes and ``avar convert`` /
``avar vas``; a leaf module (torch only).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["EXTRA_STATE_SUFFIX", "without_extra_states", "load_module_state"]

EXTRA_STATE_SUFFIX = "_extra_state"


def without_extra_states(keys) -> list[str]:
    """``keys`` without Transformer Engine's ``_extra_state`` entries (module docstring), sorted."""
    return sorted(key for key in keys if not str(key).endswith(EXTRA_STATE_SUFFIX))


def load_module_state(module: torch.nn.Module, state: dict, *, source: Path) -> None:
    """``module.load_state_dict(state)`` without the checkpoint's ``_extra_state`` entries, strict for the rest
    (module docstring); ValueError naming ``source`` and the first differing keys otherwise.

    The entries are never handed to the modules: Transformer Engine's ``set_extra_state`` unpickles a non-empty
    one without restriction, so a crafted checkpoint would run code on every GPU machine that loads it (the
    vetting of ``checkpoint_vetting`` sees only a byte tensor). Without FP8 they hold nothing to restore."""
    result = module.load_state_dict({key: value for key, value in state.items()
                                     if not str(key).endswith(EXTRA_STATE_SUFFIX)}, strict=False)
    missing, unexpected = without_extra_states(result.missing_keys), without_extra_states(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
