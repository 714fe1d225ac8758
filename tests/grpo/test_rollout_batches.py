"""Rollouts packed for the policy passes: a prompt's rollouts kept together, each distinct image of a row encoded
once, and the model's output for such a row equal to the row with every image repeated (logits and gradients)."""

import random

import torch

from megatron_avar.grpo.rollout_batches import pack_groups, pack_rollouts
from megatron_avar.testing import run_on_ranks
from test_grpo_policy import SEQ_LENGTH, _rollouts


def test_groups_stay_together_where_they_fit_and_rows_stay_full():
    """8 prompts x 8 rollouts: a prompt's rollouts span ~3 rows instead of first-fit-decreasing's ~7 (so its
    images are encoded ~3 times, not ~7), in as many rows."""
    from megatron_avar.training.packing import first_fit_decreasing

    rng = random.Random(0)
    lengths = [10 + rng.randint(20, 200) for _ in range(64)]
    groups = [f"p{k // 8}" for k in range(64)]
    rows = pack_groups(lengths, groups, 512)
    assert sorted(i for row in rows for i in row) == list(range(64))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert rows == pack_groups(lengths, groups, 512)  # deterministic
    by_length = first_fit_decreasing(lengths, list(range(64)), 512, buffer_size=64)

    def mean_rows_spanned(packed):
        return sum(sum(any(groups[i] == group for i in row) for row in packed) for group in set(groups)) / 8

    assert mean_rows_spanned(rows) <= 0.5 * mean_rows_spanned(by_length)
    assert len(rows) <= len(by_length) + 1


def test_a_rows_distinct_images_are_kept_once_with_their_sources(sft_inputs):
    rollouts, pad_id = _rollouts(sft_inputs["hf_path"], sft_inputs["data_path"], num_prompts=3, n=3)
    rows = pack_rollouts(rollouts, seq_length=SEQ_LENGTH, pad_token_id=pad_id, image_token_id=151655,
                         spatial_merge_size=2)
    shared = 0
    for row in rows:
        occurrences = [rollouts[i] for i in row.rollouts]
        distinct = list({id(r.pixel_values): r for r in occurrences}.values())
        assert row.batch.pixel_values.shape[0] == sum(r.pixel_values.shape[0] for r in distinct)
        assert len(row.image_sources) == sum(r.image_grid_thw.shape[0] for r in occurrences)
        repeated = torch.cat([row.batch.image_grid_thw[k][None] for k in row.image_sources])
        assert torch.equal(repeated, torch.cat([r.image_grid_thw for r in occurrences]))
        shared += len(occurrences) - len(distinct)
    assert shared >= 3  # the case shares images: each prompt's 3 rollouts fit one row


def _distinct_vs_repeated(hf_path, data_path):
    """Logits and vision-encoder gradients of the packed rows, with each distinct image once (image_sources) and
    with every rollout's image repeated in the row."""
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.config import ParallelConfig
    from megatron_avar.training.megatron_setup import build_model, init_distributed

    rollouts, pad_id = _rollouts(hf_path, data_path, num_prompts=3, n=3)
    init_distributed(1, 1, seed=1)
    config = Qwen25VLConfig.from_hf(hf_path)
    training = build_model(config, ParallelConfig(distributed_optimizer=False), dtype=torch.float32,
                           recompute="none", role_mass_layers=(), hf_path=hf_path)
    model = training.modules[0]
    out = []
    for row in pack_rollouts(rollouts, seq_length=SEQ_LENGTH, pad_token_id=pad_id,
                             image_token_id=config.image_token_id, spatial_merge_size=2):
        b, occurrences = row.batch, [rollouts[i] for i in row.rollouts]
        common = dict(position_ids=b.position_ids, token_roles=b.roles, segment_ids=b.segment_ids)
        results = []
        for pixels, grids, sources in (
                (b.pixel_values, b.image_grid_thw, row.image_sources),
                (torch.cat([r.pixel_values for r in occurrences]), torch.cat([r.image_grid_thw for r in occurrences]),
                 None)):
            training.zero_grad_buffer()
            logits = model(b.input_ids, pixel_values=pixels, image_grid_thw=grids, image_sources=sources, **common)
            weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
            (logits * weights).sum().backward()
            grads = {name: p.main_grad.clone() for name, p in model.named_parameters()  # DDP's gradient buffer
                     if name.startswith("vision.")}
            results.append((logits.detach(), grads))
        out.append(results)
    return out


def test_distinct_images_give_the_repeated_images_logits_and_gradients(sft_inputs):
    rows = run_on_ranks(_distinct_vs_repeated, 1, sft_inputs["hf_path"], sft_inputs["data_path"], timeout_s=300)[0]
    for (logits, grads), (logits_repeated, grads_repeated) in rows:
        assert torch.equal(logits, logits_repeated)
        assert len(grads) > 10 and all(bool(grad.abs().sum() > 0) for grad in grads.values())
        for name, grad in grads.items():  # a repeated image's gradient summed in another order: fp32 rounding
            error = float((grad - grads_repeated[name]).norm() / grads_repeated[name].norm())
            assert error < 1e-5, (name, error)
