"""The Megatron actor against Hugging Face, and against itself across parallel layouts.

- Old log-probs, log softmax(logits / T)[token], equal HF Qwen2.5-VL's on the same prompt + response tokens.
- r_visual from the masses of the SAME pass equals the definition (docs/method.md, 'Visual-anchored reward (GRPO)')
  computed from HF eager attention probabilities: per response query and layer, head-mean mass on IMAGE keys over
  head-mean mass on SYSTEM keys + ε, averaged over layers then tokens.
- One GRPO update at TP=2, TP=2 with sequence parallelism, PP=2, DP=2 and CP=2 (rows split over 2 context-parallel
  ranks) gives the loss metrics, gradient norm, r_visual and updated log-probs of the single-rank update (the loss
  is normalised by global token counts, so the layout cannot change it).

Rollouts are the toy model's real prompts (real tokenizer, images of the procedural dataset) with random
responses, several packed per row, so the test does not depend on a generation backend.
"""

import pytest
import torch

from megatron_avar.testing import run_on_ranks

pytestmark = pytest.mark.multiprocess
TEMPERATURE = 0.7
SEQ_LENGTH = 512
COMPARED = ("loss/policy", "loss/pg_loss", "loss/clip_fraction", "loss/approx_kl", "loss/ratio_mean",
            "optim/grad_norm")


def _rollouts(hf_path, data_path, *, num_prompts=3, n=2, seed=0):
    from megatron_avar.data.conversations import load_conversations, to_chat_messages
    from megatron_avar.grpo.interfaces import Rollout
    from megatron_avar.processor import load_processor
    from megatron_avar.roles import TokenRole, render_conversation

    processor = load_processor(hf_path, min_pixels=3136, max_pixels=12544)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    generator = torch.Generator().manual_seed(seed)
    rollouts = []
    for record in list(load_conversations(data_path))[:num_prompts]:
        messages = [m for m in to_chat_messages(record) if m["role"] != "assistant"]
        prompt = render_conversation(messages, processor, add_generation_prompt=True)
        for k in range(n):
            length = int(torch.randint(4, 24, (1,), generator=generator))
            response = torch.cat([torch.randint(1000, 20000, (length,), generator=generator), torch.tensor([im_end])])
            rollouts.append(Rollout(
                prompt_id=record["id"], sample_index=k, ground_truth=str(record["answer"]),
                input_ids=torch.cat([prompt.input_ids, response]),
                roles=torch.cat([prompt.roles, torch.full_like(response, int(TokenRole.RESPONSE))]),
                prompt_length=len(prompt), response_text="", generator_logprobs=torch.zeros(length + 1),
                finish_reason="stop", pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw))
    return rollouts, processor.tokenizer.pad_token_id


def _policy_runs(hf_path, data_path, layouts):
    """On every rank: for each (tp, pp), old log-probs + r_visual, one update, the new log-probs. Each DP rank
    takes its contiguous share of the rollouts (whole prompt groups)."""
    from megatron.core import parallel_state

    from megatron_avar.grpo.loss import PolicyLossConfig
    from megatron_avar.grpo.policy import MegatronPolicy
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.config import OptimConfig, ParallelConfig
    from megatron_avar.training.megatron_setup import build_model, build_optimizer, init_distributed

    rollouts, pad_id = _rollouts(hf_path, data_path, num_prompts=4)
    advantages = torch.linspace(-1.0, 1.0, len(rollouts))
    results = {}
    for tp, pp, *options in layouts:  # options: "sp" sequence parallelism, "cp" context parallelism over 2 ranks
        cp = 2 if "cp" in options else 1
        layout = init_distributed(tp, pp, seed=1, cp=cp)
        qwen_config = Qwen25VLConfig.from_hf(hf_path)
        layers = tuple(range(qwen_config.text.num_layers))
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  sequence_parallel="sp" in options, context_parallel_size=cp,
                                  distributed_optimizer=False)
        model = build_model(qwen_config, parallel, dtype=torch.float32, recompute="none", role_mass_layers=layers,
                            hf_path=hf_path)
        build_optimizer(model, OptimConfig(lr=1e-3), steps=4, dtype=torch.float32)
        policy = MegatronPolicy(model, qwen_config, visual_layers=layers, epsilon=1e-6, seq_length=SEQ_LENGTH,
                                temperature=TEMPERATURE, loss=PolicyLossConfig(clip_low=0.1, clip_high=0.1),
                                pad_token_id=pad_id)
        share = len(rollouts) // layout.dp
        mine = slice(layout.dp_rank * share, (layout.dp_rank + 1) * share)
        ours = rollouts[mine]
        old = policy.log_probs_with_masses(ours)
        # A perturbed "old" policy, so ratios differ from 1 and some are clipped.
        # (a function of the rollout's global index and the column, so every layout perturbs alike).
        rows = torch.arange(mine.start, mine.stop, dtype=torch.float32)[:, None]
        perturbed = old.logp + 0.2 * torch.sin(37 * rows + torch.arange(old.logp.shape[1])[None, :])
        metrics = policy.train_step(ours, perturbed, advantages[mine])
        new = policy.log_probs_with_masses(ours)
        results[(tp, pp, *options)] = {"slice": (mine.start, mine.stop), "logp": old.logp, "r_visual": old.r_visual,
                             "metrics": metrics, "new_logp": new.logp}
        if pp == 2:
            results["nonfinite"] = _nonfinite_update(policy, ours, old.logp, advantages[mine])
        parallel_state.destroy_model_parallel()
    return results


def _nonfinite_update(policy, rollouts, old_logp, advantages) -> str:
    """An update whose loss is NaN for one rollout (a NaN old log-prob), computed on the last pipeline stage
    only: every rank must come back from the update and raise the trainer's error, none left waiting."""
    from types import SimpleNamespace

    from megatron_avar.grpo.trainer import _check_update
    from megatron_avar.training.run_loop import NonFiniteUpdateError

    broken = old_logp.clone()
    broken[1, 0] = float("nan")
    metrics = policy.train_step(rollouts, broken, advantages)
    try:
        _check_update(policy, metrics, step=3, update=0, updates=1,
                      prompts=SimpleNamespace(prompt_ids=[r.prompt_id for r in rollouts[::2]]), grad_norm_known=True)
    except NonFiniteUpdateError as error:
        return str(error)
    return "no error"


def _losses_refusing_host_syncs(policy) -> None:
    """Every micro-batch's loss function (the old-log-prob pass's and the update's) run with host reads refused:
    inside the schedule, a read of the device would stall it once per micro-batch."""
    from megatron_avar.testing.host_syncs import refusing_host_syncs

    schedule = policy._schedule

    def guarded(micro_batches, forward_step, *, forward_only):
        def step(data_iterator, model):
            output, loss_func = forward_step(data_iterator, model)

            def checked(*args):
                with refusing_host_syncs("in a GRPO micro-batch's loss"):
                    return loss_func(*args)
            return output, checked
        schedule(micro_batches, step, forward_only=forward_only)

    policy._schedule = guarded


def _kl_update(hf_path, data_path):
    """One update with a KL term to a given reference: the metrics, the old and the reference log-probs; the
    micro-batches' losses read nothing from the device."""
    from megatron.core import parallel_state

    from megatron_avar.grpo.loss import PolicyLossConfig
    from megatron_avar.grpo.policy import MegatronPolicy
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.config import OptimConfig, ParallelConfig
    from megatron_avar.training.megatron_setup import build_model, build_optimizer, init_distributed

    rollouts, pad_id = _rollouts(hf_path, data_path, num_prompts=2)
    init_distributed(1, 1, seed=1)
    qwen_config = Qwen25VLConfig.from_hf(hf_path)
    layers = tuple(range(qwen_config.text.num_layers))
    model = build_model(qwen_config, ParallelConfig(distributed_optimizer=False), dtype=torch.float32, recompute="none",
                        role_mass_layers=layers, hf_path=hf_path)
    build_optimizer(model, OptimConfig(lr=1e-3), steps=4, dtype=torch.float32)
    policy = MegatronPolicy(model, qwen_config, visual_layers=layers, epsilon=1e-6, seq_length=SEQ_LENGTH,
                            temperature=TEMPERATURE, loss=PolicyLossConfig(kl_coef=0.1), pad_token_id=pad_id)
    _losses_refusing_host_syncs(policy)
    old = policy.log_probs_with_masses(rollouts)
    # The trainer's frozen reference (build_model(trainable=False)): same weights, no DDP, no gradients; its
    # log-probs come without masses (no probe runs: it would raise here).
    frozen = build_model(qwen_config, ParallelConfig(), dtype=torch.float32, recompute="none", role_mass_layers=layers,
                         hf_path=hf_path, trainable=False)
    reference = MegatronPolicy(frozen, qwen_config, visual_layers=layers, epsilon=1e-6, seq_length=SEQ_LENGTH,
                               temperature=TEMPERATURE, loss=PolicyLossConfig(kl_coef=0.1), pad_token_id=pad_id)
    from unittest import mock

    import megatron_avar.models.role_mass_attention as layer_module

    with mock.patch.object(layer_module, "role_mass", side_effect=AssertionError("the reference ran the probe")):
        frozen_logp = reference.log_probs(rollouts)
    frozen_facts = {"equal": bool(torch.equal(frozen_logp, old.logp)),
                    "trainable": any(p.requires_grad for p in frozen.parameters()),
                    "wrapped": any(chunk is not module for chunk, module in zip(frozen.chunks, frozen.modules))}
    ref = old.logp + 0.3 * torch.cos(torch.arange(old.logp.shape[1], dtype=torch.float32))[None, :]
    advantages = torch.linspace(-1.0, 1.0, len(rollouts))
    with pytest.raises(ValueError, match="exactly when loss.kl_coef > 0"):
        policy.train_step(rollouts, old.logp, advantages)
    metrics = policy.train_step(rollouts, old.logp, advantages, ref_logp=ref)
    parallel_state.destroy_model_parallel()
    return {"metrics": metrics, "old": old.logp, "ref": ref, "advantages": advantages,
            "lengths": [r.response_length for r in rollouts], "frozen": frozen_facts}


def test_the_kl_term_to_a_reference_policy(sft_inputs):
    """The policy is the one that produced ``old`` (ratio 1), so the reported KL is the k3 estimate between old
    and reference log-probs, and the token-mean loss is the policy-gradient mean plus kl_coef times it."""
    from megatron_avar.grpo.loss import k3_kl

    out = run_on_ranks(_kl_update, 1, sft_inputs["hf_path"], sft_inputs["data_path"], timeout_s=300)[0]
    # the frozen reference gives the same log-probs as the policy it started as, holding weights only
    assert out["frozen"] == {"equal": True, "trainable": False, "wrapped": False}
    mask = torch.arange(out["old"].shape[1])[None, :] < torch.tensor(out["lengths"])[:, None]
    expected_kl = k3_kl(out["old"], out["ref"])[mask].double().mean()
    expected_pg = -(out["advantages"][:, None].expand_as(mask)[mask]).double().mean()
    metrics = out["metrics"]
    assert metrics["loss/kl_ref"] == pytest.approx(float(expected_kl), rel=1e-5)
    assert metrics["loss/pg_loss"] == pytest.approx(float(expected_pg), rel=1e-5, abs=1e-7)
    assert metrics["loss/policy"] == pytest.approx(float(expected_pg + 0.1 * expected_kl), rel=1e-5, abs=1e-7)


def _hf_reference(hf_path, rollouts):
    """Per rollout: response log-probs at TEMPERATURE and r_visual from eager attention probabilities."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_avar.roles import TokenRole

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    image_token = model.config.image_token_id
    logps, visuals = [], []
    for r in rollouts:
        ids = r.input_ids[None]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        mm_token_type_ids=(ids == image_token).int(),
                        pixel_values=r.pixel_values, image_grid_thw=r.image_grid_thw, output_attentions=True)
        p = r.prompt_length
        logits = out.logits[0, p - 1:-1].float() / TEMPERATURE
        logps.append(torch.log_softmax(logits, -1).gather(-1, r.input_ids[p:, None])[:, 0])
        image, system = r.roles == TokenRole.IMAGE, r.roles == TokenRole.SYSTEM
        ratios = []
        for probs in out.attentions:                                    # [1, H, L, L] per layer
            queries = probs[0, :, p:, :].double()                        # [H, T, L]
            m_img = queries[..., image].sum(-1).mean(0)                  # head mean, [T]
            m_sys = queries[..., system].sum(-1).mean(0)
            ratios.append(m_img / (m_sys + 1e-6))
        visuals.append(float(torch.stack(ratios).mean(0).mean()))
    return logps, torch.tensor(visuals, dtype=torch.float64)


@pytest.fixture(scope="module")
def runs(sft_inputs):
    single = run_on_ranks(_policy_runs, 1, sft_inputs["hf_path"], sft_inputs["data_path"], [(1, 1)],
                          timeout_s=400)[0]
    two = run_on_ranks(_policy_runs, 2, sft_inputs["hf_path"], sft_inputs["data_path"],
                       [(1, 1), (2, 1), (1, 2), (2, 1, "sp"), (1, 1, "cp")], timeout_s=600)
    return single, two


def test_old_log_probs_and_r_visual_equal_hf_eager(runs, sft_inputs):
    single, _ = runs
    rollouts, _ = _rollouts(sft_inputs["hf_path"], sft_inputs["data_path"], num_prompts=4)
    logps, visuals = _hf_reference(sft_inputs["hf_path"], rollouts)
    ours = single[(1, 1)]
    for i, (r, expected) in enumerate(zip(rollouts, logps)):
        got = ours["logp"][i, :r.response_length]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert bool((ours["logp"][i, r.response_length:] == 0).all())
    torch.testing.assert_close(ours["r_visual"].double(), visuals, rtol=1e-4, atol=1e-6)
    assert float(visuals.min()) > 0


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2), (2, 1, "sp"), (1, 1, "cp")],
                         ids=["dp2", "tp2", "pp2", "tp2_sp", "cp2"])
def test_update_equals_the_single_rank_update(runs, layout):
    single, two = runs
    reference = single[(1, 1)]
    assert 0 < reference["metrics"]["loss/clip_fraction"] < 1  # the perturbed old policy clips some tokens
    for rank in two:
        ours = rank[layout]
        start, stop = ours["slice"]
        width = ours["logp"].shape[1]
        torch.testing.assert_close(ours["logp"], reference["logp"][start:stop, :width], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours["r_visual"], reference["r_visual"][start:stop], rtol=1e-5, atol=1e-6)
        for name in COMPARED:
            assert ours["metrics"][name] == pytest.approx(reference["metrics"][name], rel=1e-5, abs=1e-7), name
        torch.testing.assert_close(ours["new_logp"], reference["new_logp"][start:stop, :width], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(reference["new_logp"], reference["logp"])  # the update changed the policy


def test_a_nonfinite_loss_on_the_last_stage_stops_every_rank_naming_the_rollout(runs, sft_inputs):
    _, two = runs
    rollouts, _ = _rollouts(sft_inputs["hf_path"], sft_inputs["data_path"], num_prompts=4)
    culprit = f"{rollouts[1].prompt_id}/{rollouts[1].sample_index}"
    for rank in two:  # the first stage too, which never saw the loss
        assert "step 3: policy update 1 of 1 is not finite" in rank["nonfinite"]
        assert f"The loss was not finite for rollouts (prompt/sample) {culprit}." in rank["nonfinite"]
