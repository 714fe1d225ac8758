"""The `avar` command (also `python -m megatron_avar`): one subcommand per job.

Each subcommand lives in the module that owns its concept and exposes ``register(subparsers)``,
which adds its parser and sets ``handler`` (a function of the parsed namespace returning an exit
code). Those modules keep heavy imports (torch models, datasets) inside their handlers, so
``avar --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that contribute subcommands, in the order `avar --help` lists them.
SUBCOMMAND_MODULES = (
    "megatron_avar.data.cli",
    "megatron_avar.convert.cli",
    "megatron_avar.sft.cli",
    "megatron_avar.grpo.cli",
    "megatron_avar.plan.cli",
    "megatron_avar.analysis.cli",
    "megatron_avar.eval.cli",
    "megatron_avar.synth.cli",
    "megatron_avar.sweep.cli",
    "megatron_avar.quickstart",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avar",
        description="AVAR (attention-guided multimodal reasoning) on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    subparsers = parser.add_subparsers(title="subcommands", dest="subcommand", metavar="SUBCOMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for sub in subparsers.choices.values():  # `avar convert` alone shows convert's subcommands, not avar's
        sub.set_defaults(help_parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        getattr(args, "help_parser", parser).print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        # Bad input raises ValueError with a message that names the problem and the fix: show just that.
        # A FileNotFoundError is a path given wrong (a config value or flag read before anything checked it):
        # its one line names the path, and the traceback would only show where it was read.
        # AVAR_DEBUG=1 shows the traceback too.
        if os.environ.get("AVAR_DEBUG") == "1":
            raise
        if isinstance(error, FileNotFoundError) and error.filename is not None:
            error = f"{error.strerror or error}: {error.filename} (AVAR_DEBUG=1 shows where it was read)"
        print(f"avar {args.subcommand}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C stops at once (what is published is whole: every file is replaced atomically); a stop that
        # finishes the step and saves a checkpoint is SIGTERM / SIGUSR1, as Slurm sends them.
        if os.environ.get("AVAR_DEBUG") == "1":
            raise
        stop = (" (a training run saves a checkpoint and stops after its step on SIGUSR1 or SIGTERM to its ranks: "
                "scancel --batch --signal=USR1 JOBID under Slurm)" if args.subcommand in ("sft", "grpo") else "")
        print(f"\navar {args.subcommand}: interrupted{stop}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
