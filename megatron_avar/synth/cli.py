"""`avar synth`: reflection data synthesis with NeMo Curator (docs/method.md, 'Reflection data synthesis (VARD)')."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="synthesise visual-anchored reflection SFT data with teacher models (NeMo Curator pipeline)",
        description=(
            "Runs read -> describe (VLM teacher) -> reason (LLM teacher) -> anchor -> verify -> write over the "
            "sources in the config, through OpenAI-compatible endpoints. Writes OUT/data/shard-*.parquet "
            "(conversation format, images embedded) and OUT/manifest.json. Rerunning an unfinished run with its "
            "settings resumes it without repeating any teacher request. Every config field and its default: "
            "megatron_avar/synth/config.py."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML config (see examples/synth/); default: all defaults")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. run.executor=local reason.num_candidates=4 sources.0.limit=100")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(handler=_synth)


def _synth(args) -> int:
    from megatron_avar.config import config_to_dict, load_config
    from megatron_avar.synth.config import SynthConfig

    config = load_config(SynthConfig, args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron_avar.synth").setLevel(logging.INFO)
    from megatron_avar.synth.pipeline import SynthRunError, run_synthesis

    try:
        manifest = run_synthesis(config)
    except SynthRunError as error:
        # Not a usage error (exit 2, which the top-level CLI gives ValueError): the run itself failed.
        print(f"avar synth: error: {error}", file=sys.stderr)
        return 1
    summary = {key: manifest[key] for key in ("read", "kept", "filters", "tokens", "elapsed_s")}
    print(json.dumps(summary, indent=2))
    return 0
