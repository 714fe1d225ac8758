"""Benchmark one GRPO step: the breakdown (refit, generate, old log-probs with masses, update) and the cost of
the visual reward inside the old-log-prob pass.

  python tools/bench_grpo.py                      # GPU: 7B widths, 4 LM layers, bf16
  python tools/bench_grpo.py --tiny               # CPU: the toy widths (a smoke run of the same code path)

Model: a random-weight Qwen2.5-VL written as an HF checkpoint (megatron_avar.models.qwen2_5_vl.toy) with
Qwen2.5-VL-7B's language widths (hidden 3584, 28 query / 4 kv heads, FFN 18944, the real vocabulary) and
--layers layers, or the toy widths with --tiny. Prompts: the procedural visual-reasoning dataset. One process
(TP = PP = DP = 1), the local generation backend (HF with a KV cache; vLLM is measured by
tools/bench_grpo_refit.py and needs its own GPU environment).

Phases, as `avar grpo` runs them (megatron_avar.grpo.trainer.grpo_step): refit (policy.named_weights ->
backend.update_weights), generate (--prompts x --n rollouts of --max-new-tokens), old log-probs with masses
(policy.log_probs_with_masses: every layer an AVAR layer, VisualRewardSink attached), update (policy.train_step).
Each phase is timed after an untimed warm-up call (kernel compilation and autotuning, optimizer states):
refit, the log-prob passes and the update as the median of --repeats calls, generation once.

Visual-reward cost = t(old log-probs, AVAR layers + sink) / t(old log-probs, no sink) − 1, on the same rollouts
and the same model, each the median of --repeats passes: without a sink the AVAR layers (probe mode) run only
the platform's fastest causal attention, so the difference is the role_mass probe on the response rows and the
reward's bookkeeping. Target: <= 5% on a GPU.

FLOPs of one old-log-prob pass (forward only) = training_flops / 3 with megatron_avar.training.metrics:
  2·(P_lm - V·h)·T + 2·V·h·T_out + 2·L·d·Σ s_i² + 2·P_vision·Σ p_j + 4·hv·F·Σ p_j²
  (T tokens of the packed rollouts, T_out their response tokens (the output layer's), s_i rollout lengths, p_j
  patches of image j — each distinct image of a packed row once, as the pass encodes them —, F full-attention
  vision blocks)

Results: tools/results/bench_grpo_<device>_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy widths (CPU smoke run)")
    parser.add_argument("--layers", type=int, default=4, help="language decoder layers")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "tools" / "results"))
    return parser.parse_args()


def _median_seconds(fn, repeats: int, *, warmup: int = 0) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones (first calls compile and autotune
    kernels, allocate optimizer states and fill the allocator's cache)."""
    from megatron_avar import platform

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if platform.cuda_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if platform.cuda_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _plain_log_probs(policy, rollouts):
    """The old-log-prob pass of ``policy`` without a mass sink: the same attention, no masses."""
    from megatron_avar.grpo.interfaces import response_token_mask

    micro_batches = policy._stage(policy._pack(rollouts))
    columns = int(response_token_mask(rollouts).shape[1])

    def forward_step(data_iterator, ddp_model):
        _, mb = next(data_iterator)
        output = policy._forward(ddp_model, mb)
        return output, lambda logits: (policy._response_log_probs(logits, mb, columns).sum() * 0, {})

    with torch.no_grad():
        policy._schedule(micro_batches, forward_step, forward_only=True)


def main() -> int:
    args = _arguments()
    # the toy checkpoint and the prompts live in a folder that is removed when the benchmark ends, even on an error
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as work:
        return _benchmark(args, Path(work))


def _benchmark(args: argparse.Namespace, work: Path) -> int:
    from megatron_avar import platform
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.grpo.interfaces import SamplingParams
    from megatron_avar.grpo.local_backend import LocalGenerationBackend
    from megatron_avar.grpo.loss import PolicyLossConfig
    from megatron_avar.grpo.policy import MegatronPolicy
    from megatron_avar.grpo.prompts import GRPODataConfig, PromptLoader, build_prompt_processor
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint
    from megatron_avar.training.config import OptimConfig, ParallelConfig
    from megatron_avar.training.megatron_setup import build_model, build_optimizer, init_distributed
    from megatron_avar.training.metrics import frame_patches, training_flops

    gpu = platform.cuda_available()
    dtype = torch.bfloat16 if gpu and not args.tiny else torch.float32
    toy = ToyModelConfig(num_layers=args.layers) if args.tiny else ToyModelConfig(
        num_layers=args.layers, hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4,
        vision_depth=2, vision_hidden_size=1280, min_pixels=256 * 28 * 28, max_pixels=256 * 28 * 28)
    hf_path = write_toy_checkpoint(work / "model", toy)
    data = write_dataset(ProceduralConfig(num_samples=args.prompts, image_size=(448, 448)), work / "data")
    layout = init_distributed(1, 1, seed=0)
    qwen_config = Qwen25VLConfig.from_hf(str(hf_path))
    layers = tuple(range(qwen_config.text.num_layers))
    data_config = GRPODataConfig(path=str(data), max_prompt_length=2048)
    processor = build_prompt_processor(data_config, str(hf_path))
    _, prompts = next(iter(PromptLoader(data_config, processor, prompts_per_step=args.prompts)))
    # The longest rollout fits a row.
    seq_length = max(int(ids.numel()) for ids in prompts.input_ids) + args.max_new_tokens

    def policy_of(role_layers):
        model = build_model(qwen_config, ParallelConfig(distributed_optimizer=False), dtype=dtype, recompute="none",
                            role_mass_layers=role_layers, hf_path=str(hf_path))
        build_optimizer(model, OptimConfig(lr=1e-6), steps=10, dtype=dtype)
        return MegatronPolicy(model, qwen_config, visual_layers=layers, epsilon=1e-6, seq_length=seq_length,
                              temperature=1.0, loss=PolicyLossConfig(), pad_token_id=processor.tokenizer.pad_token_id)

    policy = policy_of(layers)
    plain = policy  # the same model and attention: only the sink, hence the probe, is left out
    backend = LocalGenerationBackend(str(hf_path), processor, device=platform.current_device(), dtype=dtype)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, seed=0)
    rows = {}
    rows["refit"] = _median_seconds(lambda: backend.update_weights(policy.named_weights()), args.repeats, warmup=1)
    backend.generate(prompts, 1, dataclasses.replace(sampling, max_new_tokens=2))  # warm-up: kernels, allocator
    started = time.perf_counter()
    rollouts = backend.generate(prompts, args.n, sampling)
    rows["generate"] = time.perf_counter() - started
    policy.log_probs_with_masses(rollouts)  # warm-up (kernels, allocator)
    _plain_log_probs(plain, rollouts)
    rows["old log-probs + masses"] = _median_seconds(lambda: policy.log_probs_with_masses(rollouts), args.repeats)
    rows["old log-probs, plain attention (baseline)"] = _median_seconds(lambda: _plain_log_probs(plain, rollouts),
                                                                        args.repeats)
    old = policy.log_probs_with_masses(rollouts)
    advantages = torch.linspace(-1, 1, len(rollouts))
    rows["update"] = _median_seconds(lambda: policy.train_step(rollouts, old.logp, advantages), args.repeats,
                                     warmup=1)

    lengths = [int(r.input_ids.numel()) for r in rollouts]
    # the images the pass encodes: each distinct image of a packed row once (grpo.rollout_batches)
    patches = [p for mb in policy._pack(rollouts) if mb.batch.image_grid_thw is not None
               for p in frame_patches(mb.batch.image_grid_thw)]
    responses = sum(r.response_length for r in rollouts)
    forward_flops = training_flops(qwen_config, sample_lengths=lengths, image_patches=patches,
                                   output_tokens=responses) / 3
    overhead = rows["old log-probs + masses"] / rows["old log-probs, plain attention (baseline)"] - 1
    device = torch.cuda.get_device_name() if gpu else "cpu"
    from results_meta import git_commit, results_stem

    result = {"device": device, "commit": git_commit("megatron_avar", "tools/bench_grpo.py"), "dtype": str(dtype),
              "model": vars(toy) | {"tiny": args.tiny},
              "rollouts": len(rollouts), "tokens": sum(lengths),
              "generated_tokens": sum(r.response_length for r in rollouts),
              "seconds": rows, "old_logprob_tflops": forward_flops / rows["old log-probs + masses"] / 1e12,
              "visual_reward_overhead": overhead, "layout": str(layout)}
    date = datetime.date.today().isoformat()
    tag = ("cpu-smoke" if not gpu else device.replace(" ", "-").lower()) + ("-tiny" if args.tiny else "")
    stem = results_stem(args.out, f"bench_grpo_{tag}_{date}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# GRPO step breakdown ({device}, {dtype}, {len(rollouts)} rollouts, {sum(lengths)} tokens)", "",
             f"Commit `{result['commit']}`, {date}.", "",
             "| phase | seconds |", "|---|---|"] + [f"| {name} | {value:.3f} |" for name, value in rows.items()]
    lines += ["", f"Visual-reward cost in the old-log-prob pass: {100 * overhead:+.1f}% over the baseline "
                  "(target <= 5% on a GPU).",
              f"Old-log-prob pass: {result['old_logprob_tflops']:.3f} TFLOP/s (forward FLOPs = training_flops / 3)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
