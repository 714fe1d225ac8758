"""The RMSNorm of megatron's local (non-Transformer-Engine) modules and of the vision encoder: usable under
sequence parallelism, and lean in what it keeps for backward.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel``. Under sequence parallelism each
tensor-parallel rank normalises its own slice of the sequence, so a norm weight's gradient on one rank is a
partial sum; megatron's ``finalize_model_grads`` all-reduces, over the tensor-parallel group, the gradients of
every parameter marked ``sequence_parallel`` (Transformer Engine's norms mark theirs). :class:`TorchNorm` builds
the norm with megatron's norm constructor and marks its parameters, so the local modules give the gradients of
the unsplit model. Its weights are in the model's ``params_dtype``, as Transformer Engine's norms, megatron's
``Float16Module`` and Hugging Face's checkpoints have them: megatron's mixed-precision optimizers (and the
distributed optimizer's buffers) expect every parameter of a bfloat16 model in bfloat16, and keep the float32
copy themselves (a float32 norm weight among them broke their checkpoints).

:class:`RMSNorm` computes what ``torch.nn.RMSNorm`` computes, in the same float32 operations
(``y = (float(x) · rsqrt(mean(float(x)²) + eps)) · w``, cast back to x's dtype; float64 stays float64), so its
outputs are bitwise torch's. torch's composite keeps, for backward, a float32 copy of the input and the float32
normalised value (8 bytes per element in bfloat16, on top of the output the next linear keeps); this one keeps
the input as it came (no copy) and one float32 rsqrt per row, and recomputes the normalised value in backward.
Its gradients are the closed form dx = rstd · (g·w − n · mean(g·w·n)), dw = Σ g·n with n = float(x) · rstd, in
float32.
"""

from __future__ import annotations

import torch

__all__ = ["TorchNorm", "RMSNorm", "rms_norm"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (torch's opmath type)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        upcast = x.to(_compute_dtype(x))
        rstd = torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (upcast * rstd * weight.to(upcast.dtype)).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normalised = x.to(rstd.dtype) * rstd
        grad = grad.to(rstd.dtype)
        scaled = grad * weight.to(rstd.dtype)
        grad_x = rstd * (scaled - normalised * (scaled * normalised).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normalised).reshape(-1, weight.numel()).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension with ``weight`` [x.shape[-1]] (module docstring), in x's dtype."""
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension (``torch.nn.RMSNorm``'s outputs, parameter ``weight``), keeping only its
    input and a float32 rsqrt per row for backward (module docstring)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class TorchNorm:
    """:class:`RMSNorm` / ``torch.nn.LayerNorm`` with megatron's norm constructor, parameters marked
    ``sequence_parallel`` when ``config.sequence_parallel``, weights in ``config.params_dtype`` (a drop-in for
    ``WrappedTorchNorm`` in layer specs)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm") -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("layernorm_zero_centered_gamma / memory_efficient_layer_norm need Transformer Engine "
                             "norms")
        if config.normalization == "RMSNorm":
            norm = RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: allowed RMSNorm, LayerNorm")
        for param in norm.parameters():
            # an attribute megatron's finalize_model_grads reads (not declared on torch's Parameter)
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))  # noqa: B010
        return norm
