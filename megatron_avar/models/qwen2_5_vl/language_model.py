"""The language model: megatron's GPTModel whose output layer can run on the positions a loss reads only.

Training reads the logits of labelled positions alone (SFT: the response tokens; GRPO: the rollouts' response
tokens), yet the output layer of a 152k vocabulary is the largest matmul of a token's path at 7B (V·h = 545M
of its 7.1B weights) and its logits the largest transient of the step (tokens x V / tp values, upcast to fp32
by the cross entropy). Given ``RoleMassParams.output_rows``, the last stage runs the output layer and the loss
on those rows only:

    hidden [S, B, H] (sequence parallel: [S / tp, B, H], all-gathered first, each rank's gradient its own part)
      -> rows [N, 1, H] -> logits [N, 1, V / tp] -> loss [N]  (or logits [N, V / tp] without labels)

Under tensor parallelism the output layer's input is replicated over the TP ranks and its gradient all-reduced
(megatron's ColumnParallelLinear without sequence parallelism); with sequence parallelism on, the layer's own
all-gather / reduce-scatter of the whole sequence is replaced by the all-gather here (backward: each rank keeps
its slice) and the all-reduce of the N selected rows' gradient. The cross entropy is megatron's
(``compute_language_model_loss``, fused or not as the config says).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

__all__ = ["LanguageModel", "check_output_rows"]


def check_output_rows(rows: torch.Tensor | None) -> None:
    """TypeError unless ``rows`` is None or a 1-D int64 / int32 tensor (shape and dtype only: nothing is read from
    the device; the positions come from the trainers' own host-side indexes)."""
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
        got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise TypeError(f"output_rows must be a 1-D int64 (or int32) tensor of flat positions b·S' + i of this rank's "
                        f"tokens (S' = S / context_parallel_size), got {got}")


class LanguageModel(GPTModel):
    """GPTModel with the output layer restricted to ``packed_seq_params.output_rows`` when that is set (module
    docstring); otherwise megatron's own postprocess, unchanged."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        rows = getattr(kwargs.get("packed_seq_params"), "output_rows", None)
        if rows is None or not self.post_process:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        if self.mtp_process or self.config.defer_embedding_wgrad_compute:
            # (megatron's deferred weight gradient re-gathers the sequence-parallel inputs it buffered, sized by the
            # first micro-batch: the rows here are whole and their count changes per micro-batch)
            raise NotImplementedError("output_rows with multi-token prediction or defer_embedding_wgrad_compute")
        layer = self.output_layer
        sequence_parallel = layer.sequence_parallel
        if sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # backward: each rank keeps its own slice of the (already all-reduced) gradient
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                                 group=self.pg_collection.tp)
        seq, batch = hidden_states.shape[:2]
        # flat [B, S] positions b·S + i -> rows of the [S, B] layout, i·B + b (device arithmetic, no read)
        index = torch.remainder(rows, seq) * batch + torch.div(rows, seq, rounding_mode="floor")
        selected = hidden_states.reshape(seq * batch, -1).index_select(0, index).unsqueeze(1)  # [N, 1, H]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        layer.sequence_parallel = False  # the rows are whole on every rank now (megatron's inference does the same)
        try:
            logits, _ = layer(selected, weight=weight, runtime_gather_output=kwargs.get("runtime_gather_output"))
        finally:
            layer.sequence_parallel = sequence_parallel
        if labels is None:
            return logits.squeeze(1)  # [N, V / tp]
        targets = labels.reshape(-1).index_select(0, rows).unsqueeze(0)  # [1, N] (megatron's [b, s])
        return self.compute_language_model_loss(targets, logits).squeeze(0)  # [N]
