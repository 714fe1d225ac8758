"""`avar sweep --config FILE [dotted.key=value ...]`: submit a grid of `avar sft` runs as Slurm jobs, wait, collect.
`avar sweep collect --out DIR`: collect again (results.csv/.json, agto_overhead.csv, plots) without submitting."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

POLL_SECONDS = 10.0  # between squeue calls while a sweep waits for its jobs

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="scaling sweep: a grid of SFT runs as Slurm jobs -> throughput / MFU / memory CSV and plots",
        description="Submit every point of the sweep config (examples/sweeps/) that has not finished and has no "
                    "job in the queue, as sbatch jobs of the config's script (at most max_concurrent at once), "
                    "wait for them and collect <out>/results.csv, results.json, agto_overhead.csv and plots. "
                    "Run it from the repository root. `avar sweep collect --out DIR` only collects. Every field "
                    "of megatron_avar/sweep/config.py can be overridden as dotted.key=value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="sweep YAML config (see examples/sweeps/)")
    parser.add_argument("--out", help="the sweep directory, for `avar sweep collect` (default: the config's out)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return; collect later")
    parser.add_argument("--poll-seconds", type=float, default=None,
                        help=f"seconds between squeue calls while waiting (at least 1; {POLL_SECONDS:g} if not given)")
    parser.add_argument("--timeout-seconds", type=float, default=None,
                        help="give up waiting after this many seconds (> 0; the jobs go on)")
    parser.add_argument("overrides", nargs="*", metavar="collect | KEY=VALUE",
                        help="`collect`, or dotted overrides of the sweep config")
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    from megatron_avar.config import load_config
    from megatron_avar.sweep.collect import collect
    from megatron_avar.sweep.config import SweepConfig

    if "collect" in args.overrides[1:]:
        raise ValueError("`collect` comes first, before any KEY=VALUE override: avar sweep collect --out DIR")
    if args.overrides[:1] == ["collect"]:
        given = {"--no-wait": args.no_wait, "--poll-seconds": args.poll_seconds is not None,
                 "--timeout-seconds": args.timeout_seconds is not None}
        waiting = [flag for flag, set_ in given.items() if set_]
        if waiting:
            raise ValueError(f"`avar sweep collect` does not wait for jobs: {', '.join(waiting)} apply only to a "
                             "sweep that submits (avar sweep --config FILE)")
        if args.out is None and args.config is None:
            raise ValueError("`avar sweep collect` needs --out DIR (or --config FILE)")
        out = args.out or load_config(SweepConfig, args.config, args.overrides[1:]).out
        rows = collect(out)
        return 0 if rows else 1
    if args.config is None:
        raise ValueError("--config FILE is required (or `avar sweep collect --out DIR`)")
    poll_seconds = POLL_SECONDS if args.poll_seconds is None else args.poll_seconds
    if not poll_seconds >= 1:  # (0 asked squeue hundreds of times a second)
        raise ValueError(f"--poll-seconds {poll_seconds:g}: give at least 1 (seconds between squeue calls)")
    if args.timeout_seconds is not None and not args.timeout_seconds > 0:
        raise ValueError(f"--timeout-seconds {args.timeout_seconds:g}: give a positive number of seconds, or leave "
                         "it out to wait until the jobs end")
    config = load_config(SweepConfig, args.config, args.overrides)
    points = _checked_points(config)
    from megatron_avar.sweep.fit import DOES_NOT_FIT, describe_misfit, plan_points

    plans = plan_points(config, points)  # {} without a gpu setting
    runnable = [p for p in points if plans.get(p.name, {}).get("fits", True)]
    for point in points:
        if point not in runnable:
            print(f"[sweep] {point.name}: {describe_misfit(plans[point.name])}; not submitted")
    out = Path(config.out)
    points_record = [{**p.as_dict(), "plan": plans.get(p.name)} for p in points]
    from megatron_avar.sweep.submit import submit_points, wait_for_jobs

    jobs = submit_points(config, runnable, repo=Path.cwd(),
                         record={"config": dataclasses.asdict(config), "points": points_record})
    if args.no_wait:
        print(f"[sweep] submitted; collect with: avar sweep collect --out {out}")
        return 0
    wait_for_jobs([ids[-1] for name, ids in jobs.items() if any(p.name == name for p in runnable)],
                  poll_s=poll_seconds, timeout_s=args.timeout_seconds)
    rows = collect(out)
    grid = {point.name for point in points}  # (an earlier grid's points stay in the results, not in the verdict)
    return 0 if all(row["state"] in ("ok", DOES_NOT_FIT) for row in rows if row["name"] in grid) else 1


def _checked_points(config):
    """The sweep's points, after checking that the script exists here and that every point's SFT config loads
    (a typo in an override fails now, not after hours in the queue)."""
    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.sweep.grid import resolve_points

    if not Path(config.script).is_file():
        raise ValueError(f"script {config.script} not found from {Path.cwd()}: run `avar sweep` from the repository "
                         "root or set script=")
    if not Path(config.sft_config).is_file():
        raise ValueError(f"sft_config {config.sft_config} does not exist")
    points = resolve_points(config)
    for point in points:
        try:
            load_config(SFTConfig, config.sft_config, [*point.overrides, f"out={point.run_dir}"])
        except ValueError as error:
            raise ValueError(f"point {point.name}: its SFT config does not load: {error}") from None
    return points
