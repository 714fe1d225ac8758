"""`avar grpo`: GRPO with the visual reward on a Megatron actor (docs/method.md, 'Visual-anchored reward (GRPO)').

One step, on every data-parallel replica for its share of the step's prompts:

    refit       policy.named_weights() ──> backend.update_weights        (in memory, HF names)
    generate    backend.generate(prompts, n, sampling)                   rollouts, grouped by prompt
    old logp    policy.log_probs_with_masses(rollouts)                   log-probs + r_visual, ONE forward
    (ref logp   reference.log_probs(rollouts)                            only with loss.kl_coef > 0)
    reward      reward.score(response, truth, r_visual) ──> group_advantages
    update      policy.train_step(...)  × train.updates_per_step         (each on an equal share of groups)

The loop only sees the three interfaces of ``grpo.interfaces``; the backend comes from the registry of
``grpo.backends`` by ``rollout.backend``, and every rank holds one. Around refit and generate the loop calls
the backend's ``prepare_generation`` / ``finish_generation`` (vLLM, colocated, wakes up and then sleeps through
the update). Where rollouts are generated is the backend's business: the local backend on the first rank of
each model-parallel group, broadcasting the rollouts (or its error) to the group; vLLM in every rank at the
trainer's tensor parallelism. A rollout-engine crash fails the step on every rank together: nothing of the
step is trained, and a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist

from megatron_avar import platform
from megatron_avar.grpo.advantages import group_advantages
from megatron_avar.grpo.backends import build_backend, model_parallel_source
from megatron_avar.grpo.config import RESUME_FIXED, GRPOConfig
from megatron_avar.grpo.interfaces import GenerationBackend, Policy, Rollout, SamplingParams
from megatron_avar.grpo.rewards import RewardParts
from megatron_avar.grpo.rollout_metrics import reduce_rollout_stats, rollout_stats
from megatron_avar.processor import check_processor_fits_model
from megatron_avar.training.run_loop import check_run_inputs

__all__ = ["run_grpo", "RolloutEngineError"]


class RolloutEngineError(RuntimeError):
    """The generation backend failed; the step is abandoned before any update."""


def _generate(backend: GenerationBackend, prompts, config: GRPOConfig, step: int) -> list[Rollout]:
    """This replica's rollouts, on every rank of its model-parallel group (where they are generated is the
    backend's business: ``grpo.backends``); any failure is a RolloutEngineError naming the step and prompts."""
    sampling = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                              top_k=config.rollout.top_k, max_new_tokens=config.rollout.max_new_tokens,
                              seed=config.rollout.seed + step)
    failure: RolloutEngineError | None = None
    rollouts: list[Rollout] = []
    try:
        rollouts = backend.generate(prompts, config.rollout.n, sampling)
    except Exception as error:  # noqa: BLE001 — any engine failure ends the step the same way
        failure = RolloutEngineError(f"step {step}: rollout generation failed ({type(error).__name__}: {error}) "
                                     f"for prompts {prompts.prompt_ids[:4]}...; no update was made — rerun the "
                                     "same command to resume from the last checkpoint")
        failure.__cause__ = error
    # Groups are contiguous runs of n (group_advantages): a backend returning another order would compare
    # rollouts of different prompts, silently.
    n = config.rollout.n
    expected = [(prompt_id, k) for prompt_id in prompts.prompt_ids for k in range(n)]
    if failure is None and [(r.prompt_id, r.sample_index) for r in rollouts] != expected:
        failure = RolloutEngineError(f"step {step}: the rollout backend returned {len(rollouts)} rollouts not in "
                                     f"prompt-major order (prompt p's sample k at p x {n} + k, for "
                                     f"{len(prompts.prompt_ids)} prompts x {n}); a backend must keep that order "
                                     "(grpo.interfaces.GenerationBackend.generate)")
    _stop_together(failure, step)  # the others would wait for this rank in the update's collectives
    return rollouts


def _rollouts(step: int, prompts, *, policy: Policy, backend: GenerationBackend, config: GRPOConfig,
              timings: dict[str, float]) -> list[Rollout]:
    """Refit the backend to the policy's weights, then generate between the backend's ``prepare_generation`` and
    ``finish_generation`` (vLLM wakes up, then sleeps through the policy's passes); times into ``timings``."""
    started = time.monotonic()
    # The refit first: vLLM wakes only its weights for it, and its KV cache after, once the policy's gathered
    # copy of the weights is gone (both at once would not fit beside the trainer).
    weights = iter(policy.named_weights())  # collective: every rank walks the policy's weights
    failure = None
    try:
        backend.update_weights(weights)
        backend.prepare_generation()
    except Exception as error:  # noqa: BLE001 — a failed refit or wake-up (out of memory) ends the step
        failure = RolloutEngineError(f"step {step}: the rollout engine's refit or wake-up failed "
                                     f"({type(error).__name__}: {error}); no update was made — rerun the same "
                                     "command to resume from the last checkpoint")
        failure.__cause__ = error
        for _ in weights:  # the walk gathers tensor-parallel shards: finish it, the peers are inside it
            pass
    # Agreed before anyone generates: generation is itself collective (vLLM's tensor-parallel forward, the
    # context-parallel share of the prompts), and a rank that skipped it would leave its peers inside it.
    _stop_together(failure, step)
    timings["perf/refit_seconds"] = time.monotonic() - started

    started = time.monotonic()
    rollouts = _generate(backend, prompts, config, step)
    failure = None
    try:
        backend.finish_generation()
    except Exception as error:  # noqa: BLE001 — the engine keeps the GPU: the update would not fit beside it
        failure = RolloutEngineError(f"step {step}: the rollout engine failed to release the GPU after generating "
                                     f"({type(error).__name__}: {error}); no update was made — rerun the same "
                                     "command to resume from the last checkpoint")
        failure.__cause__ = error
    _stop_together(failure, step)
    timings["perf/generate_seconds"] = time.monotonic() - started
    return rollouts


def _stop_together(failure: RolloutEngineError | None, step: int) -> None:
    """Collective over every rank: raise ``failure`` here, and on the ranks where all went well a
    RolloutEngineError naming the rank that failed and its error, when the rollout engine failed on any rank (the
    others would wait for it in the step's collectives)."""
    platform.stop_together(failure, f"step {step}: the rollout engine", error=RolloutEngineError)


def _start_backend(config: GRPOConfig, processor, layout) -> GenerationBackend:
    """This rank's rollout backend (``grpo.backends``), released until the first step. Built before the
    trainer's model: vLLM needs its share of GPU memory free when it starts."""
    backend = build_backend(config, processor, layout)
    backend.finish_generation()
    return backend


def grpo_step(step: int, prompts, *, policy: Policy, backend: GenerationBackend, reward, config: GRPOConfig,
              reference=None) -> dict[str, float]:
    """One GRPO step for this replica's prompts (module docstring); returns globally reduced metrics.
    reference: the frozen reference policy (loss.kl_coef > 0), whose log-probs of the rollouts enter the KL."""
    from megatron.core import parallel_state

    timings: dict[str, float] = {}
    rollouts = _rollouts(step, prompts, policy=policy, backend=backend, config=config, timings=timings)
    generated = sum(r.response_length for r in rollouts)

    started = time.monotonic()
    old = policy.log_probs_with_masses(rollouts)
    timings["perf/logprob_seconds"] = time.monotonic() - started
    ref_logp = None
    if reference is not None:
        started = time.monotonic()
        ref_logp = reference.log_probs(rollouts)
        timings["perf/reference_logprob_seconds"] = time.monotonic() - started

    parts = _graded(step, rollouts, old.r_visual, reward)
    advantages = group_advantages(torch.tensor([p.total for p in parts], dtype=torch.float64), config.rollout.n,
                                  mode=config.advantage.mode, eps=config.advantage.eps)
    stats = rollout_stats(rollouts, parts, old.r_visual, advantages, old.logp)

    started = time.monotonic()
    updates = config.train.updates_per_step
    per_update = len(rollouts) // updates  # whole groups: prompts per replica is a multiple of `updates`
    update_metrics: list[dict[str, float]] = []
    for k in range(updates):
        part = slice(k * per_update, (k + 1) * per_update)
        width = max(r.response_length for r in rollouts[part])
        update_metrics.append(policy.train_step(
            rollouts[part], old.logp[part][:, :width], advantages[part],
            ref_logp=None if ref_logp is None else ref_logp[part][:, :width]))
        _check_update(policy, update_metrics[-1], step=step, update=k, updates=updates, prompts=prompts,
                      grad_norm_known=config.optim.clip_grad > 0)
    timings["perf/update_seconds"] = time.monotonic() - started

    device = platform.current_device()  # collectives on the backend's device (NCCL: the GPU)
    metrics = reduce_rollout_stats(stats, group=parallel_state.get_data_parallel_group(), device=device)
    for name in update_metrics[0]:  # the step's: maxima, the tokens trained on (summed), means of the rest
        values = [m[name] for m in update_metrics]
        metrics[name] = max(values) if name.endswith("_max") else \
            sum(values) if name == "data/response_tokens" else sum(values) / len(values)
    generated_total = torch.tensor([float(generated)], device=device)
    dist.all_reduce(generated_total, group=parallel_state.get_data_parallel_group())
    metrics.update(timings)
    metrics["perf/generated_tokens_per_second"] = float(generated_total) / max(timings["perf/generate_seconds"], 1e-9)
    if metrics["advantage/zero_fraction"] == 1.0 and dist.get_rank() == 0:
        # (found in review: a run whose every step was this trained nothing, and said nothing)
        print(f"step {step + 1}: every group's rollouts have equal rewards (reward/total "
              f"{metrics['reward/total']:.4g}), so every advantage is 0 and this step's update changes nothing "
              "(e.g. no rollout answered correctly, which also gates out the visual term: reward/visual_term)",
              flush=True)
    return metrics


def _step_prompts(batches, step: int):
    """This replica's prompts of ``step``, from the prompt loader; collective: a replica whose prompts fail to
    render (an image gone, an unreadable file) stops every rank (``platform.agreed``)."""
    data_step, prompt_batch = platform.agreed(lambda: next(batches), f"step {step}: rendering the prompts")
    if data_step != step:
        raise RuntimeError(f"the prompt loader is at step {data_step}, the trainer at {step}")
    return prompt_batch


def _graded(step: int, rollouts: list[Rollout], r_visual, reward) -> list[RewardParts]:
    """Each rollout's reward parts; collective: grading that fails on one rank (a visual score out of range)
    stops every rank (``platform.agreed``), and the model-parallel peers take one rank's grades
    (:func:`_agreed_rewards`)."""
    return _agreed_rewards(platform.agreed(
        lambda: [reward.score(r.response_text, r.ground_truth, float(v)) for r, v in zip(rollouts, r_visual)],
        f"step {step}: grading the rollouts"))


def _agreed_rewards(parts: list[RewardParts]) -> list[RewardParts]:
    """The rewards of the first rank of this rank's model-parallel group (then of its context-parallel group) on
    every rank of them. Those ranks hold the same rollouts and grade them each, but grading need not agree: a
    math-verify timeout (a wall-clock alarm) can fire on a loaded rank and not on its peer, and ranks of one
    model with different advantages would train its replicated weights (norms, biases) apart, silently."""
    from megatron.core import parallel_state

    group, source = model_parallel_source()
    sources = [(group, source)]
    if parallel_state.get_context_parallel_world_size() > 1:
        # (megatron's getters are unannotated: a type checker sees the union of their module globals' types)
        cp_group = cast(dist.ProcessGroup, parallel_state.get_context_parallel_group())
        sources.append((cp_group, dist.get_process_group_ranks(cp_group)[0]))
    sources = [(group, source) for group, source in sources if dist.get_world_size(group) > 1]
    if not sources:
        return parts
    values = torch.tensor([[p.accuracy, p.format, p.visual, p.total] for p in parts], dtype=torch.float64,
                          device=platform.current_device())
    for group, source in sources:  # model-parallel first: its sources are the ranks the context-parallel one reads
        dist.broadcast(values, src=source, group=group)
    return [dataclasses.replace(part, accuracy=a, format=f, visual=v, total=t)
            for part, (a, f, v, t) in zip(parts, values.cpu().tolist())]


def _check_update(policy, metrics: dict[str, float], *, step: int, update: int, updates: int, prompts,
                  grad_norm_known: bool) -> None:
    """Collective, after each policy update: raise NonFiniteUpdateError on every rank when its loss, gradient
    norm or updated weights are not finite, naming the step and its prompts over all data-parallel replicas.
    Checked here, at the update that caused it: otherwise the next step's rollouts and attention masses come
    out NaN and the error would blame those. grad_norm_known: the optimizer computes the norm (clipping on)."""
    from megatron.core import parallel_state

    from megatron_avar.training.run_loop import NonFiniteUpdateError, nonfinite_update

    checked = {name: value for name, value in metrics.items() if name.startswith("loss/")}
    if grad_norm_known:
        checked["optim/grad_norm"] = metrics["optim/grad_norm"]
    problems = nonfinite_update(policy.model, checked)
    if not problems:
        return
    gathered: list = [None] * parallel_state.get_data_parallel_world_size()  # each rank's prompt ids
    dist.all_gather_object(gathered, list(prompts.prompt_ids), group=parallel_state.get_data_parallel_group())
    ids = [str(prompt_id) for replica in gathered for prompt_id in replica]
    shown = ", ".join(ids[:64]) + (f", ... ({len(ids)} in all)" if len(ids) > 64 else "")
    losses: list = [None] * dist.get_world_size()  # known on the last pipeline stage only
    dist.all_gather_object(losses, list(policy.nonfinite_loss_rollouts))
    failed = sorted({rollout for rank_list in losses for rollout in rank_list})
    culprits = (f" The loss was not finite for rollouts (prompt/sample) {', '.join(failed[:32])}"
                f"{f', ... ({len(failed)} in all)' if len(failed) > 32 else ''}." if failed else "")
    raise NonFiniteUpdateError(
        f"step {step}: policy update {update + 1} of {updates} is not finite ({'; '.join(problems)}): the optimizer "
        f"update diverged.{culprits} Prompts of this step: {shown}. Lower optim.lr (or check the loss settings), "
        f"or inspect these prompts")


def run_grpo(config: GRPOConfig) -> dict:
    """Train per ``config`` (collective over all ranks); returns the run summary (also <out>/summary.json)."""
    check_run_inputs(config)  # before any process group or run directory exists
    from megatron_avar.training import checkpointing
    from megatron_avar.training.megatron_setup import init_distributed
    from megatron_avar.training.run_loop import holding_run

    preemption = checkpointing.PreemptionFlag()  # first: signals during start-up are honoured after a step
    parallel = config.parallel
    layout = init_distributed(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                              seed=config.train.seed, vpp=parallel.virtual_pipeline_model_parallel_size,
                              cp=parallel.context_parallel_size)
    per_replica = config.train.prompts_per_step // layout.dp
    if config.train.prompts_per_step % layout.dp or per_replica % config.train.updates_per_step:
        raise ValueError(f"train.prompts_per_step ({config.train.prompts_per_step}) must split evenly over the "
                         f"{layout.dp} data-parallel replicas and then over train.updates_per_step "
                         f"({config.train.updates_per_step})")
    # Resume, refuse, or do nothing (a finished run) — decided before anything is written (run_loop.plan_start).
    with holding_run(config, RESUME_FIXED, layout=layout) as (start, schedule):
        return _train(config, layout, start, schedule, preemption)


def _train(config: GRPOConfig, layout, start, schedule: dict, preemption) -> dict:
    """:func:`run_grpo` once its run directory is locked and its start decided (``run_loop.holding_run``)."""
    from megatron.core import parallel_state

    from megatron_avar.config import config_to_dict
    from megatron_avar.grpo.policy import MegatronPolicy
    from megatron_avar.grpo.prompts import PromptLoader, build_prompt_processor
    from megatron_avar.grpo.rewards import VisualAnchoredReward
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.megatron_setup import build_model, build_optimizer
    from megatron_avar.training.metrics import MetricsLogger
    from megatron_avar.training.run_loop import (
        enter_run_dir,
        finished_run_summary,
        hf_export_describer,
        resume_checkpoint,
        run_steps,
    )

    parallel = config.parallel
    out = Path(config.out)
    if start.finished:
        parallel_state.destroy_model_parallel()
        return finished_run_summary(out, start, steps=config.train.steps, announce=layout.is_logging_rank)
    resume_from = start.resume_from

    qwen_config = Qwen25VLConfig.from_hf(config.model.hf_path)
    visual_layers = config.reward.layer_indexes(qwen_config.text.num_layers)
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    data_config = config.data
    processor = build_prompt_processor(data_config, data_config.processor_path or config.model.hf_path)
    check_processor_fits_model(processor, qwen_config)
    from megatron_avar.vllm_inputs import MAX_IMAGES_PER_PROMPT

    prompts = PromptLoader(data_config, processor, prompts_per_step=config.train.prompts_per_step,
                           dp_rank=layout.dp_rank, dp_size=layout.dp,
                           max_images=MAX_IMAGES_PER_PROMPT if config.rollout.backend == "vllm" else None)
    backend = _start_backend(config, processor, layout)  # before the model (see _start_backend)
    model = build_model(qwen_config, parallel, dtype=dtype, recompute=config.train.recompute,
                        role_mass_layers=visual_layers, hf_path=None if resume_from else config.model.hf_path,
                        checkpoint_follows=resume_from is not None)
    build_optimizer(model, config.optim, steps=config.train.steps * config.train.updates_per_step, dtype=dtype,
                    reschedule=config.checkpoint.reschedule)

    def policy_of(training_model) -> MegatronPolicy:
        return MegatronPolicy(training_model, qwen_config, visual_layers=visual_layers, epsilon=config.reward.epsilon,
                              seq_length=config.seq_length, temperature=config.rollout.temperature, loss=config.loss,
                              pad_token_id=processor.tokenizer.pad_token_id,
                              role_attention_impl=config.model.role_attention_impl,
                              mass_mode=config.model.mass_mode)

    policy = policy_of(model)
    reward = VisualAnchoredReward(config.reward)
    reference = None
    if config.loss.kl_coef > 0:  # the starting weights, frozen (also after a resume: always from model.hf_path)
        # The policy's AVAR layers (under mass_mode=fused they take `out` from the fused kernel); its passes give
        # them no sink (Policy.log_probs), so under the probe no layer computes masses
        reference_model = build_model(qwen_config, parallel, dtype=dtype, recompute="none",
                                      role_mass_layers=visual_layers, hf_path=config.model.hf_path, trainable=False)
        reference = policy_of(reference_model)
    start_step = start.start_step
    if resume_from is not None:
        resume_checkpoint(config, start, model, prompts, layout=layout)
    enter_run_dir(config, start, layout=layout)  # every refusal passed

    describe = hf_export_describer(config.model.hf_path, tokenizer=processor.tokenizer, layout=layout, dtype=dtype,
                                   source=f"avar grpo {config.out}")
    logger = MetricsLogger(out, total_steps=config.train.steps, enabled=layout.is_logging_rank,
                           tensorboard=config.log.tensorboard, wandb_project=config.log.wandb_project,
                           run_config=config_to_dict(config), first_step=start_step)
    batches = iter(prompts)

    def step_fn(step: int) -> dict[str, float]:
        prompt_batch = _step_prompts(batches, step)
        started = time.monotonic()
        metrics = grpo_step(step, prompt_batch, policy=policy, backend=backend, reward=reward, config=config,
                            reference=reference)
        metrics["perf/step_seconds"] = time.monotonic() - started
        return metrics

    try:
        with logger:
            summary = run_steps(step_fn, start_step=start_step, steps=config.train.steps, run_dir=out, model=model,
                                data=prompts, layout=layout, logger=logger, preemption=preemption,
                                log_interval=config.log.interval, checkpoint=config.checkpoint, describe=describe,
                                schedule=schedule, summary_fields=lambda: {"prompts": prompts.summary()})
    finally:
        backend.close()
    parallel_state.destroy_model_parallel()
    return summary
