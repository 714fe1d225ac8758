"""`avar grpo --config FILE [dotted.key=value ...]`: GRPO with the visual-anchored reward (run under torchrun /
srun for several ranks; one process without them)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "grpo", help="GRPO reinforcement learning with the visual-attention reward (Megatron actor)",
        description="GRPO on a Megatron actor: rollouts from the local (HF, KV cache) or vLLM backend, reward "
                    "r = r_acc + lambda_v * r_visual * 1[r_acc > 0] + lambda_f * r_format "
                    "(docs/method.md, 'Visual-anchored reward (GRPO)'), r_visual from the attention masses of the "
                    "old-log-prob pass. Every field of megatron_avar/grpo/config.py can be set in the YAML file or "
                    "overridden as dotted.key=value (e.g. rollout.n=8 reward.lambda_visual=0.3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see examples/grpo/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config")
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    from megatron_avar.config import load_config
    from megatron_avar.grpo.config import GRPOConfig
    from megatron_avar.grpo.trainer import run_grpo

    config = load_config(GRPOConfig, args.config, args.overrides)
    run_grpo(config)
    return 0
