"""Attach a per-layer auxiliary loss to the graph where the layer runs (megatron's MoE aux-loss pattern).

Under pipeline parallelism a layer's loss term cannot be added to the final loss: the layer lives on another
stage. Instead the layer's output is passed through :class:`AttachAuxLoss`, the identity in the forward pass,
which in the backward pass also starts the aux loss's own backward with gradient ``scale``. The gradient
then reaches the layer's parameters exactly as if the term were part of the loss the schedule backpropagates.

``scale`` folds in what the schedule does to the main loss but cannot do to a term it never sees: the
gradient-accumulation / data-parallel normalisation and the fp16 loss scale (see ``training.objective``).
"""

from __future__ import annotations

import torch

__all__ = ["AttachAuxLoss", "attach_aux_loss"]


class AttachAuxLoss(torch.autograd.Function):
    """out = activation; backward: d activation = grad, d aux_loss = scale."""

    @staticmethod
    def forward(ctx, activation: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(activation: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``activation`` unchanged, carrying ``aux_loss`` (a scalar) into the backward pass with weight ``scale``.

    Nothing is attached when grad is disabled or the aux loss has no graph (evaluation, the no-grad first
    pass of activation recompute: the recomputed pass attaches it)."""
    if not torch.is_grad_enabled() or not aux_loss.requires_grad:
        return activation
    return AttachAuxLoss.apply(activation, aux_loss, float(scale))
