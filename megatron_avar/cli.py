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


# The subcommands that checkpoint and stop on SIGTERM / SIGUSR1: held from here on (``stop_signals``).
TRAINING_SUBCOMMANDS = ("sft", "grpo")


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in TRAINING_SUBCOMMANDS:
        from megatron_avar import stop_signals

        with stop_signals.held():  # first: before the seconds of imports that follow, which a signal would cut short
            return _run(argv)
    return _run(argv)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides after a flag (`avar sft a=1 --config X b=2`): argparse takes one run of a positional
        # list, so the second run reaches here; anything else is a mistake, shown with the subcommand's usage
        if isinstance(getattr(args, "overrides", None), list) and all(_is_override(word) for word in extra):
            args.overrides.extend(extra)
        else:
            getattr(args, "help_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "handler", None) is None:
        getattr(args, "help_parser", parser).print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError) as error:
        # Bad input raises ValueError with a message that names the problem and the fix: show just that.
        # An OSError is a path given wrong or a file system that refused (a missing input, an unwritable or
        # full output, a folder where a file belongs) met before anything checked it: its one line names the
        # error and the path, and the traceback would only show where. AVAR_DEBUG=1 shows the traceback too.
        if os.environ.get("AVAR_DEBUG") == "1":
            raise
        print(f"avar {args.subcommand}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C stops at once (what is published is whole: every file is replaced atomically); a stop that
        # finishes the step and saves a checkpoint is SIGTERM / SIGUSR1, as Slurm sends them.
        if os.environ.get("AVAR_DEBUG") == "1":
            raise
        stop = (" (a training run saves a checkpoint and stops after its step on SIGUSR1 or SIGTERM to its ranks: "
                "scancel --batch --signal=USR1 JOBID under Slurm)" if args.subcommand in TRAINING_SUBCOMMANDS else "")
        print(f"\navar {args.subcommand}: interrupted{stop}", file=sys.stderr)
        return 130


def _is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def _one_line(error: Exception) -> str:
    if not isinstance(error, OSError) or error.filename is None:
        return str(error)
    paths = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
    return f"{error.strerror or error}: {paths} (AVAR_DEBUG=1 shows where)"


if __name__ == "__main__":
    raise SystemExit(main())
