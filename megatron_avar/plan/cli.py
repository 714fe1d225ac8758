"""`avar plan --config FILE [dotted.key=value ...]`: per-GPU memory and step time of an `avar sft` / `avar grpo` run
before it is submitted (a table, or ``--json``)."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "format_plan"]

_GB = 1e9
_LABELS: dict[str, str] = {
    "weights": "weights", "gradients": "gradients (fp32)", "optimizer_states": "optimizer states",
    "decoder_activations": "decoder activations", "vision_activations": "vision encoder activations",
    "avar_masses": "AVAR masses", "head_inputs": "final norm / LM head inputs",
    "reference_model": "reference model", "rollout_engine_asleep": "vLLM engine, asleep (assumed)",
    "rollout_model_copy": "rollout model copy (local backend)", "logits": "logits",
    "weight_gradient": "weight gradient", "recomputed_layer": "recomputed layer",
    "recomputed_vision_block": "recomputed vision block",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="per-GPU memory and step time of an sft / grpo config, and whether it fits H100 / H200",
        description="Predict the per-GPU memory of an `avar sft` or `avar grpo` run from its config: weights, fp32 "
                    "gradients, distributed-optimizer states, activations by recompute mode and layout, in-flight "
                    "pipeline micro-batches, the vision encoder, the LM head's logits and the AVAR masses; the step "
                    "time at a stated MFU; a verdict per GPU. Model sizes come from model.hf_path/config.json, "
                    "or --model when that is not on this machine. Formulas: megatron_avar/plan/memory.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="the YAML config of `avar sft` or `avar grpo`")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config")
    parser.add_argument("--command", choices=("sft", "grpo"), default=None,
                        help="which command the config is for; None: grpo when it has a rollout, reward, advantage "
                             "or loss section, else sft")
    parser.add_argument("--model", default=None, metavar="3b|7b|72b",
                        help="published Qwen2.5-VL size to plan with when model.hf_path has no config.json here")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs (ranks) of the job; None: the smallest multiple of TP x PP x CP filling 8 GPUs")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the step time assumes")
    parser.add_argument("--image-fraction", type=float, default=0.5,
                        help="share of a packed row's tokens that are image tokens (vision encoder memory)")
    parser.add_argument("--response-fraction", type=float, default=0.35,
                        help="sft: share of a packed row's tokens that are labelled (responses): the output layer's "
                             "logits and FLOPs")
    parser.add_argument("--sample-tokens", type=int, default=None,
                        help="mean tokens per packed sample (attention FLOPs; GRPO rows); None: min(2048, "
                             "seq_length) for sft, the longest rollout for grpo")
    parser.add_argument("--kernels", choices=("gpu", "cpu"), default="gpu",
                        help="kernel family: gpu (with or without Transformer Engine, assumed to keep the same "
                             "bytes), cpu")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of a table")
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    from megatron_avar.plan.runs import Assumptions, plan_config

    assumptions = Assumptions(gpus=args.gpus, image_fraction=args.image_fraction, sample_tokens=args.sample_tokens,
                              response_fraction=args.response_fraction, mfu=args.mfu, kernels=args.kernels)
    plan = plan_config(args.config, args.overrides, command=args.command, preset=args.model,
                       assumptions=assumptions)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _gb(value: float) -> str:
    return f"{value / _GB:8.2f}"


def format_plan(plan) -> str:
    """The plan as a readable table (GB = 1e9 bytes)."""
    from megatron_avar.plan.gpus import FRAGMENTATION, RUNTIME_RESERVE_BYTES

    p, s, a, memory = plan.parallel, plan.shape, plan.assumptions, plan.memory
    worst = memory.worst
    avar = len(s.avar_layers)
    lines = [
        f"avar plan: {plan.command}, {plan.parameters / 1e9:.2f} B parameters ({plan.model})",
        f"layout:  {p.world_size} GPUs = TP {p.tp} x PP {p.pp} x DP {p.dp} x CP {p.cp} (sequence parallel "
        f"{'on' if p.sequence_parallel else 'off'}, virtual stages {p.virtual_pipeline}), "
        f"{'distributed' if p.distributed_optimizer else 'replicated'} optimizer",
        f"step:    {s.num_microbatches} micro-batch(es) of {s.micro_batch_size} x {s.seq_length} tokens per rank, "
        f"{s.precision}, recompute {s.recompute}, {avar} AVAR layer(s), "
        f"{'LM' if s.loss == 'lm' else 'response'} loss over {s.output_rows} labelled rows",
        f"assumed: {s.image_tokens} image tokens per row (image fraction {a.image_fraction:g}"
        f"{f', response fraction {a.response_fraction:g}' if plan.command == 'sft' else ''}), samples of "
        f"{plan.sample_tokens} tokens, {s.mass_rows} AGTO query rows per row, MFU {a.mfu:g}, {a.kernels} kernels",
        "",
        f"per-GPU memory, GB (pipeline stage {worst.stage} of {p.pp}, the largest; "
        f"{worst.in_flight} forward pass(es) in flight)",
    ]
    for name, value in [*worst.static.items(), *memory.extra_static.items(), *worst.stored.items()]:
        lines.append(f"  {_LABELS.get(name, name):<36}{_gb(value)}")
    transient = max(worst.transient, key=worst.transient.__getitem__)
    shown = ", ".join(f"{_LABELS.get(k, k)} {v / _GB:.2f}" for k, v in worst.transient.items())
    label = "transient: " + (_LABELS[transient] if transient in _LABELS else transient)
    lines.append(f"  {label:<36}{_gb(worst.transient[transient])}"
                 f"   (largest of: {shown})")
    lines.append(f"  {'peak':<36}{_gb(memory.peak)}")
    if p.pp > 1:
        lines.append("  stages: " + ", ".join(f"{st.stage}: {(st.peak + sum(memory.extra_static.values())) / _GB:.1f}"
                                              for st in memory.stages))
    if plan.rollout_peak is not None:
        engine = (f" + vLLM awake {plan.engine_fraction:g} x the card" if plan.rollout_engine == "vllm"
                  else " (HF copy, KV cache)")
        lines.append(f"  {'rollout phase: trainer':<36}{_gb(plan.rollout_peak)}{engine}")
    if plan.refit_peak is not None:
        lines.append(f"  {'refit phase':<36}{_gb(plan.refit_peak)}   (trainer, weights gathered over TP"
                     + (", vLLM's weights awake)" if plan.rollout_engine == "vllm" else ")"))
    lines += ["", f"{'GPU':<12}{'memory':>9}{'needed':>9}{'headroom':>10}  {'verdict':<24}step time at MFU {a.mfu:g}"]
    for v in plan.verdicts():
        verdict = "fits" if v.fits else "does not fit"
        phase = f" ({v.phase})" if plan.rollout_peak is not None else ""
        seconds = f"{v.step_seconds:.1f} s" + (" (without generation)" if plan.command == "grpo" else "")
        lines.append(f"{v.gpu.label:<12}{_gb(v.gpu.memory_bytes):>9}{_gb(v.required_bytes):>9}"
                     f"{_gb(v.headroom_bytes):>10}  {verdict + phase:<24}{seconds}")
    lines.append(f"needed = peak x {1 + FRAGMENTATION:g} (allocator fragmentation) + "
                 f"{RUNTIME_RESERVE_BYTES / _GB:g} GB (CUDA context, NCCL, workspaces); step FLOPs: "
                 f"training.metrics.training_flops, {plan.flops_per_step / 1e15:.1f} PFLOP per step")
    return "\n".join(lines)
