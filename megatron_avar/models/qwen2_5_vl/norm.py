"""The RMSNorm of megatron's local (non-Transformer-Engine) modules, usable under sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel``. Under sequence parallelism each
tensor-parallel rank normalises its own slice of the sequence, so a norm weight's gradient on one rank is a
partial sum; megatron's ``finalize_model_grads`` all-reduces, over the tensor-parallel group, the gradients of
every parameter marked ``sequence_parallel`` (Transformer Engine's norms mark theirs). :class:`TorchNorm` builds
the same torch module as ``WrappedTorchNorm`` (float32 weights, also in a bfloat16 model) and marks its
parameters, so the local modules give the gradients of the unsplit model.
"""

from __future__ import annotations

import torch

__all__ = ["TorchNorm"]


class TorchNorm:
    """``torch.nn.RMSNorm`` / ``LayerNorm`` with megatron's norm constructor, parameters marked
    ``sequence_parallel`` when ``config.sequence_parallel`` (a drop-in for ``WrappedTorchNorm`` in layer specs)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm") -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("layernorm_zero_centered_gamma / memory_efficient_layer_norm need Transformer Engine "
                             "norms")
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization={config.normalization!r}: allowed {', '.join(norms)}")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)  # read by finalize_model_grads
        return norm
