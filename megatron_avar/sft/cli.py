"""`avar sft --config FILE [dotted.key=value ...]`: AVAR cold-start SFT (run under torchrun / srun for several
ranks; one process without them)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft", help="AVAR cold-start SFT on megatron-core (LM loss + attention-guided objective)",
        description="Train Qwen2.5-VL with L = L_LM + alpha*L_enh + beta*L_sup (docs/method.md, 'AGTO objective'). "
                    "Every field of megatron_avar/sft/config.py can be set in the YAML file or overridden as "
                    "dotted.key=value (e.g. optim.lr=1e-5 avar.layers=[8,9,10]).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see examples/sft/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config")
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.sft.trainer import run_sft

    config = load_config(SFTConfig, args.config, args.overrides)
    run_sft(config)
    return 0
