"""The Megatron actor: ``grpo.interfaces.Policy`` on megatron-core with TP / PP / DP.

- :meth:`MegatronPolicy.log_probs_with_masses`: one no-grad pass of megatron's forward schedule over the
  rollouts packed into rows (``grpo.rollout_batches``). The last stage turns its vocab-parallel logits, computed
  only at the positions that predict a response token, into response log-probs, log softmax(logits /
  temperature)[token] (the convention of both generation backends); every AVAR layer hands its per-role masses to a
  ``grpo.visual_reward.VisualRewardSink`` in the same pass, reduced over TP and PP afterwards — r_visual costs no
  extra forward. Log-probs are broadcast from the last stage, so every rank returns the same tensors.
  :meth:`MegatronPolicy.log_probs`: the same pass without the sink (the frozen reference's log-probs).
- :meth:`MegatronPolicy.train_step`: one optimizer step of ``grpo.loss.policy_loss`` over this rank's
  rollouts, normalised by counts over the whole data-parallel batch (so the step does not depend on the
  layout or the packing); megatron's 1/num_microbatches and DDP's 1/dp are undone as in SFT.
- :meth:`MegatronPolicy.named_weights`: the full weights in HF naming (TP-gathered, every PP stage's layers),
  for the generation backend's refit; no disk round trip.

Context parallelism: each CP rank holds part of every row (``models.context_parallel``). Its response log-probs
are placed at their row positions and summed over the CP group (backward: each rank's own positions), so every
CP rank holds all log-probs and computes the same loss, whose gradient reaches each rank's own tokens: the CP
ranks' gradients add up to the exact one (megatron's schedule multiplies the loss by CP and DDP averages over
DP x CP, which the loss's DP factor already accounts for). The visual-reward sink gets the masses of every
response row on every CP rank, so r_visual needs no CP reduction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_avar import platform
from megatron_avar.grpo.interfaces import PolicyLogProbs, Rollout, response_token_mask
from megatron_avar.grpo.loss import PolicyLossConfig, policy_loss
from megatron_avar.grpo.rollout_batches import RolloutMicroBatch, pack_rollouts, scatter_response_values
from megatron_avar.grpo.visual_reward import ResponseTokens, VisualRewardSink
from megatron_avar.models.context_parallel import local_positions
from megatron_avar.roles import labelled_positions

__all__ = ["MegatronPolicy", "LOSS_METRICS"]

# policy_loss metrics that are token means (averaged over the step's tokens); ratio_max is a max.
LOSS_METRICS = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "approx_kl", "ratio_mean", "pg_loss")


@dataclass
class _Staged:
    """A micro-batch staged on the device for the schedule (:meth:`MegatronPolicy._stage`). inputs: the model's
    inputs on the device, the pixels aside; pixel_values: on the host (pinned on a GPU); rollouts: int64 [rollouts
    of the row], their indexes; positions: the row's ``response_positions``; labelled: int64, the flat positions
    of the row's labels; gather / targets: the flat positions of the labels among this rank's tokens (the model's
    ``output_rows``: logits are computed there only) and the labels there (the row's, or under context parallelism
    this rank's part, ``held``: its positions in the row). All on the device but the pixels."""

    micro_batch: RolloutMicroBatch
    inputs: dict[str, torch.Tensor | None]
    pixel_values: torch.Tensor | None
    rollouts: torch.Tensor
    positions: tuple[torch.Tensor, torch.Tensor]
    labelled: torch.Tensor
    gather: torch.Tensor
    targets: torch.Tensor
    held: torch.Tensor | None


def _process_group(group) -> dist.ProcessGroup:
    """A group from megatron's parallel_state getters, typed: they are unannotated and the module globals they read
    also hold ints and lists, so a type checker infers a union; once model parallel is initialised they return a
    ProcessGroup."""
    return group


class MegatronPolicy:
    """model: ``training.megatron_setup.TrainingModel`` with its optimizer; qwen_config: the model's
    ``Qwen25VLConfig``; visual_layers: the layers r_visual averages over (AVAR layers of the model);
    seq_length: tokens per packed row; temperature: the rollouts' sampling temperature."""

    def __init__(self, model, qwen_config, *, visual_layers: Sequence[int], epsilon: float, seq_length: int,
                 temperature: float, loss: PolicyLossConfig, pad_token_id: int, role_attention_impl: str = "auto",
                 mass_mode: str = "probe"):
        self.model, self.qwen_config = model, qwen_config
        self.visual_layers, self.epsilon = tuple(visual_layers), float(epsilon)
        self.seq_length, self.temperature, self.loss = seq_length, float(temperature), loss
        self.pad_token_id, self.role_attention_impl, self.mass_mode = pad_token_id, role_attention_impl, mass_mode
        # "prompt_id/sample_index" of the rollouts whose loss was not finite in the last train_step, on the ranks
        # that compute the loss (the last pipeline stage): the trainer's collective check names them.
        self.nonfinite_loss_rollouts: list[str] = []
        from megatron.core import parallel_state

        cp_group = _process_group(parallel_state.get_context_parallel_group(check_initialized=False))
        self._cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None

    # -- helpers --------------------------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return self.model.device

    def _pack(self, rollouts: Sequence[Rollout]) -> list[RolloutMicroBatch]:
        cfg = self.qwen_config
        return pack_rollouts(rollouts, seq_length=self.seq_length, pad_token_id=self.pad_token_id,
                             image_token_id=cfg.image_token_id, spatial_merge_size=cfg.vision.spatial_merge_size)

    def _stage(self, micro_batches: Sequence[RolloutMicroBatch]) -> list[_Staged]:
        """The micro-batches' inputs on the device before the schedule runs: inside it, a blocking copy from
        pageable host memory waits for every queued GPU kernel (torch synchronises the stream after it), once
        per tensor per micro-batch. The pixels, the one large input, stay on the host, pinned on a GPU where the
        first pipeline stage copies them without a wait as each micro-batch starts (the model's forward); later
        stages never read them."""
        from megatron.core import parallel_state

        device = self._device
        first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        staged = []
        for mb in micro_batches:
            b = mb.batch
            inputs = {"input_ids": b.input_ids, "position_ids": b.position_ids, "token_roles": b.roles,
                      "segment_ids": b.segment_ids}
            pixels = b.pixel_values
            if pixels is not None and device.type == "cuda" and first_stage:
                pixels = pixels.pin_memory()
            rows, columns = mb.response_positions()
            # The labelled positions, found here on the host: of the row, and of this rank's part of it under CP.
            labelled = labelled_positions(b.labels)
            held, mine, gather = None, b.labels, labelled  # without CP this rank's logits are the row's
            if self._cp_group is not None:
                held = local_positions(b.labels.shape[1], self._cp_group.size(), self._cp_group.rank())
                mine, gather = b.labels[:, held], labelled_positions(b.labels, held)
            staged.append(_Staged(
                micro_batch=mb, inputs={k: None if v is None else v.to(device) for k, v in inputs.items()},
                pixel_values=pixels, rollouts=torch.tensor(mb.rollouts, device=device),
                positions=(rows.to(device), columns.to(device)), labelled=labelled.to(device),
                gather=gather.to(device), targets=mine.reshape(-1)[gather].to(device),
                held=None if held is None else held.to(device)))
        return staged

    def _forward(self, ddp_model, staged: _Staged, sink=None):
        # the pixels (pinned) reach the device in the first stage's forward, as each micro-batch starts; the image
        # grids stay on the host, where the vision encoder plans its work (reading them costs nothing)
        return ddp_model(**staged.inputs, pixel_values=staged.pixel_values,
                         image_grid_thw=staged.micro_batch.batch.image_grid_thw,
                         image_sources=staged.micro_batch.image_sources or None, mass_sink=sink,
                         role_attention_impl=self.role_attention_impl, mass_mode=self.mass_mode,
                         output_rows=staged.gather)

    @staticmethod
    def _finite_rows(logp_new, old_logp, advantages, mask) -> torch.Tensor:
        """bool [rollouts]: whether each rollout's loss inputs are finite on its response tokens (on the device;
        read once per step, see train_step)."""
        finite = torch.isfinite(torch.where(mask, logp_new.detach(), 0.0)).all(-1)
        finite &= torch.isfinite(torch.where(mask, old_logp, 0.0)).all(-1)
        return finite & torch.isfinite(advantages)

    @staticmethod
    def _nonfinite_rollouts(finite, staged: Sequence[_Staged], rollouts: Sequence[Rollout]) -> list[str]:
        """"prompt_id/sample_index" of the rollouts whose loss was not finite: those whose inputs were not, or
        every rollout of a micro-batch whose loss overflowed as a whole. One read of the device for the step."""
        if not finite:  # not the last pipeline stage: no loss here
            return []
        flags = torch.cat([torch.cat([rows, loss.reshape(1)]) for _, rows, loss in finite]).tolist()
        failed, position = [], 0
        for index, rows, _ in finite:
            rows_ok, loss_ok = flags[position:position + rows.shape[0]], flags[position + rows.shape[0]]
            position += rows.shape[0] + 1
            if not loss_ok:
                names = [f"{rollouts[i].prompt_id}/{rollouts[i].sample_index}"
                         for i in staged[index].micro_batch.rollouts]
                failed += [name for name, ok in zip(names, rows_ok) if not ok] or names
        return failed

    def _response_log_probs(self, logits: torch.Tensor, staged: _Staged, num_columns: int) -> torch.Tensor:
        """[rollouts of mb, num_columns] log softmax(logits / T)[next token] at the response tokens, from the
        vocab-parallel logits [N, V / tp] the model computed at the labelled positions of this rank's tokens only
        (``output_rows=staged.gather``: not the prompts nor the row's padding tail). Indexes are the staged ones: no
        boolean mask, whose result size the host would have to read."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        rollouts = len(staged.micro_batch.rollouts)
        nll = vocab_parallel_cross_entropy(logits.float() / self.temperature, staged.targets)
        if self._cp_group is None:
            return scatter_response_values(-nll, staged.positions, rollouts, num_columns)
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        assert staged.held is not None  # staged under context parallelism
        batch, seq = staged.micro_batch.batch.labels.shape
        local = nll.new_zeros(batch * staged.held.shape[0]).index_put((staged.gather,), -nll)
        row = nll.new_zeros(batch, seq).index_copy(1, staged.held, local.view(batch, -1))
        row = reduce_from_tensor_model_parallel_region(row, group=self._cp_group)  # every position, every CP rank
        return scatter_response_values(row.reshape(-1)[staged.labelled], staged.positions, rollouts, num_columns)

    def _schedule(self, micro_batches, forward_step, *, forward_only: bool) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        model, data_iterator = self.model.schedule_inputs(enumerate(micro_batches))
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=model,
            num_microbatches=len(micro_batches), seq_length=self.seq_length, micro_batch_size=1,
            forward_only=forward_only)

    # -- Policy ---------------------------------------------------------------------------------------------
    def log_probs_with_masses(self, rollouts: Sequence[Rollout]) -> PolicyLogProbs:
        logp, r_visual = self._forward_only(rollouts, masses=True)
        assert r_visual is not None
        return PolicyLogProbs(logp=logp, r_visual=r_visual)

    def log_probs(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """The response log-probs alone [N, T] (the frozen reference's, for the KL): no sink, so no layer pays
        for masses nobody reads."""
        return self._forward_only(rollouts, masses=False)[0]

    def _forward_only(self, rollouts: Sequence[Rollout], *, masses: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs [N, T], r_visual [N] or None without ``masses``) on the host, the same on every rank."""
        from megatron.core import parallel_state

        # agreed: a rank that failed here alone would leave the others waiting in the schedule's collectives
        staged = platform.agreed(lambda: self._stage(self._pack(rollouts)), "packing the rollouts into rows")
        num_columns = int(response_token_mask(rollouts).shape[1])
        device = self._device
        logp = torch.zeros(len(rollouts), num_columns, device=device)
        # From the host's roles, moved with the inputs: the layers read the rows on the device.
        tokens = [ResponseTokens(s.micro_batch.batch.roles, s.micro_batch.batch.segment_ids).to(device)
                  for s in staged] if masses else []
        sinks: list[VisualRewardSink | None] = []

        def forward_step(data_iterator, ddp_model):
            index, micro_batch = next(data_iterator)
            sink = VisualRewardSink(tokens[index], self.visual_layers, epsilon=self.epsilon) if masses else None
            sinks.append(sink)
            output = self._forward(ddp_model, micro_batch, sink)

            def loss_func(logits):
                values = self._response_log_probs(logits, micro_batch, num_columns)
                logp[micro_batch.rollouts] = values
                return values.new_zeros(()), {}

            return output, loss_func

        self.model.train(False)
        with torch.no_grad():
            self._schedule(staged, forward_step, forward_only=True)
        self.model.train()
        r_visual = None
        if masses:
            groups = [_process_group(parallel_state.get_tensor_model_parallel_group())]
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                groups.append(_process_group(parallel_state.get_pipeline_model_parallel_group()))
            r_visual = torch.zeros(len(rollouts), device=device)
            for sink, micro_batch in zip(sinks, staged):
                assert sink is not None
                sink.all_reduce(groups)
                r_visual[micro_batch.rollouts] = sink.r_visual().to(device)
            r_visual = r_visual.cpu()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast(logp, src=last, group=_process_group(parallel_state.get_pipeline_model_parallel_group()))
        return logp.cpu(), r_visual

    def train_step(self, rollouts: Sequence[Rollout], old_logp: torch.Tensor, advantages: torch.Tensor,
                   ref_logp: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step (module docstring). ref_logp [N, T]: the frozen reference policy's log-probs of
        the same tokens, needed when ``loss.kl_coef > 0`` (then ``loss/kl_ref`` is reported)."""
        from megatron.core import parallel_state

        mask = response_token_mask(rollouts)
        num_columns = int(mask.shape[1])

        def checked_and_staged() -> list[_Staged]:
            if old_logp.shape != mask.shape or advantages.shape != (len(rollouts),):
                raise ValueError(f"old_logp {tuple(old_logp.shape)} must be {tuple(mask.shape)} and advantages "
                                 f"{tuple(advantages.shape)} must be ({len(rollouts)},)")
            if (ref_logp is None) != (self.loss.kl_coef == 0) or (ref_logp is not None
                                                                  and ref_logp.shape != mask.shape):
                raise ValueError(f"ref_logp {None if ref_logp is None else tuple(ref_logp.shape)}: pass the reference "
                                 f"log-probs [{', '.join(map(str, mask.shape))}] exactly when loss.kl_coef > 0")
            if int(mask.sum(1).min()) == 0:  # here, on the host, once: policy_loss is given the counts, checks none
                raise ValueError("every rollout needs at least one response token")
            # Everything the loss reads is on the device before the schedule, and what it reports stays there
            # until the step is done: no read of the device per micro-batch.
            return self._stage(self._pack(rollouts))

        # agreed: a rank that failed here alone would leave the others waiting in the collectives below
        staged = platform.agreed(checked_and_staged, "checking and packing the rollouts into rows")
        names = LOSS_METRICS + (("kl_ref",) if ref_logp is not None else ())
        device = self._device
        dp_group = parallel_state.get_data_parallel_group()
        counts = torch.tensor([float(mask.sum()), float(len(rollouts))], device=device)
        dist.all_reduce(counts, group=dp_group)
        num_tokens, num_sequences = int(counts[0]), int(counts[1])
        dp = parallel_state.get_data_parallel_world_size()
        scale = len(staged) * dp  # undo megatron's 1/num_microbatches and DDP's 1/dp
        old_logp, advantages, mask = old_logp.to(device), advantages.to(device), mask.to(device)
        ref_logp = None if ref_logp is None else ref_logp.to(device)
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
        ratio_max = torch.zeros((), device=device)
        finite: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (micro-batch, its rows' inputs, its loss)

        def forward_step(data_iterator, ddp_model):
            index, micro_batch = next(data_iterator)
            output = self._forward(ddp_model, micro_batch)
            rows = micro_batch.rollouts

            def loss_func(logits):
                nonlocal ratio_max
                logp_new = self._response_log_probs(logits, micro_batch, num_columns)
                old_rows, advantage_rows, mask_rows = old_logp[rows], advantages[rows], mask[rows]
                loss, metrics = policy_loss(logp_new, old_rows, advantage_rows, mask_rows, self.loss,
                                            num_tokens=num_tokens, num_sequences=num_sequences,
                                            logp_ref=None if ref_logp is None else ref_logp[rows])
                # Noted, not raised here on the last stage alone (the others would wait in the schedule's
                # collectives); read after the schedule, named to every rank by the trainer's check.
                finite.append((index, self._finite_rows(logp_new, old_rows, advantage_rows, mask_rows),
                               torch.isfinite(loss)))
                sums[:-1] += torch.stack([metrics[name] for name in names]).double() * metrics["num_tokens"].double()
                sums[-1] += loss.detach().double()  # already normalised by the global counts: shares add up
                ratio_max = torch.maximum(ratio_max, metrics["ratio_max"].float())
                return loss * scale, {}

            return output, loss_func

        self.nonfinite_loss_rollouts = []
        self.model.zero_grad_buffer()
        self.model.optimizer.zero_grad()
        self._schedule(staged, forward_step, forward_only=False)
        self.nonfinite_loss_rollouts = self._nonfinite_rollouts(finite, staged, rollouts)
        update_ok, grad_norm, _ = self.model.optimizer.step()
        if not update_ok:
            raise FloatingPointError("the optimizer skipped the GRPO update (non-finite gradients)")
        lr = self.model.optimizer.param_groups[0]["lr"]  # the rate this update used, before the schedule moves on
        self.model.scheduler.step(increment=1)

        # Each token counted once: the last pipeline stage, tensor- and context-parallel rank 0, summed over DP.
        counted = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                   and parallel_state.get_context_parallel_rank() == 0)
        packed = torch.cat([sums if counted else torch.zeros_like(sums), ratio_max.double().reshape(1)])
        dist.all_reduce(packed[:-1])
        dist.all_reduce(packed[-1:], op=dist.ReduceOp.MAX)
        packed = packed.cpu()
        metrics = {f"loss/{name}": float(packed[k]) / num_tokens for k, name in enumerate(names)}
        metrics.update({"loss/policy": float(packed[len(names)]), "loss/ratio_max": float(packed[-1]),
                        "optim/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "optim/lr": lr,
                        "data/response_tokens": float(num_tokens)})
        return metrics

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every HF tensor of the model (collective over every rank: each must consume the whole iterator).
        Without pipeline parallelism one tensor at a time, gathered over TP as it is yielded. Else stage by
        stage: each stage's tensors, gathered over TP, are broadcast over the pipeline group, so every rank sees
        the whole model one stage at a time (a stage's gathered copy exists meanwhile)."""
        from megatron.core import parallel_state

        from megatron_avar.models.qwen2_5_vl.hf_mapping import iter_gathered_hf_tensors

        self.model.gather_updated_weights()  # collective over data-parallel ranks (overlap_param_gather)
        tp_group = _process_group(parallel_state.get_tensor_model_parallel_group())
        gathered = (pair for module in self.model.modules  # this rank's model chunks
                    for pair in iter_gathered_hf_tensors(module, self.qwen_config, tp_group=tp_group))
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if pp == 1:  # one gathered tensor at a time: a whole gathered copy is the model again (145 GB at 72B)
            yield from gathered
            return
        local = dict(gathered)  # this stage's, named to every stage in a header first
        group = _process_group(parallel_state.get_pipeline_model_parallel_group())
        ranks = dist.get_process_group_ranks(group)
        me = parallel_state.get_pipeline_model_parallel_rank()
        for stage, src in enumerate(ranks):
            header: list[list | None] = [
                [(name, tuple(t.shape), t.dtype) for name, t in local.items()] if stage == me else None]
            dist.broadcast_object_list(header, src=src, group=group)
            assert header[0] is not None  # filled by the broadcast from the stage's rank
            for name, shape, dtype in header[0]:
                tensor = local[name] if stage == me else torch.empty(shape, dtype=dtype, device=self._device)
                dist.broadcast(tensor, src=src, group=group)
                yield name, tensor
