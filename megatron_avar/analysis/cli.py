"""`avar vas` (VAS report of a checkpoint), `avar vas compare` (reports side by side, VAS vs accuracy),
`avar vas merge` (join data-sharded reports) and `avar intervene` (generation with the attention intervention,
graded; --sweep for a grid)."""

from __future__ import annotations

import argparse
import sys

_DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


def _add_model_options(parser, with_defaults: bool = True) -> None:
    """Options shared by `avar vas` and `avar intervene` (intervene: no defaults here, its config has them)."""
    def default(value):
        return value if with_defaults else None

    parser.add_argument("--model", help="HF Qwen2.5-VL checkpoint directory (avar vas: or a megatron checkpoint of "
                        "avar sft / avar grpo / avar convert)")
    parser.add_argument("--data",
                        help="conversation dataset (.jsonl/.json/.parquet file or folder; see README Data format)")
    parser.add_argument("--batch-size", type=int, default=default(4), help="prompts per forward / generate call (4)")
    parser.add_argument("--device", default=default("auto"),
                        help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=default("auto"), choices=("auto", "float32", "bfloat16", "float16"),
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device-map", default=None,
                        help="e.g. 'auto': spread a large model over the visible GPUs (needs accelerate: gpu extra)")
    parser.add_argument("--impl", default=default("auto"), choices=("auto", "blockwise", "triton", "reference"),
                        help="role_attention implementation (auto)")


def register(subparsers) -> None:
    # No defaults here (VASConfig has them): a flag left as None was not given, so `avar vas compare` / `merge`
    # can refuse one given before them, which they would ignore.
    vas = subparsers.add_parser(
        "vas",
        help="Visual Attention Score of a checkpoint (or `avar vas compare REPORT...`)",
        description="Compute the VAS (docs/method.md, 'Visual Attention Score (VAS)') of an HF Qwen2.5-VL "
                    "checkpoint from a prompt-only prefill: `avar vas --model DIR --data FILE --out DIR`. Compare "
                    "reports: `avar vas compare REPORT... [--accuracy FILE] [--out DIR]`.")
    _add_model_options(vas, with_defaults=False)
    vas.add_argument("--out", help="output folder for report.json and the figures")
    vas.add_argument("--num-samples", type=int, help="use the first N records (200)")
    vas.add_argument("--layers", help="decoder layers: all (the default), middle, A-B (inclusive) or i,j,k")
    vas.add_argument("--exclude-sink", action="store_true", default=None,
                     help="top-level numbers without the sink (position 0) in K_sys; report.json always holds both")
    vas.add_argument("--shard", default=None,
                     help="I/N: only records I, I+N, ... (one job per GPU); join the reports with `avar vas merge`")
    vas.add_argument("--name", default=None,
                     help="label of this checkpoint in `avar vas compare`; None: the model folder's name")
    vas.add_argument("--overwrite", action="store_true", default=None,
                     help="replace the report of an earlier run in --out")
    commands = vas.add_subparsers(title="vas commands", dest="vas_command", metavar="COMMAND")
    compare = commands.add_parser("compare", formatter_class=_DEFAULTS,
                                  help="VAS reports side by side; VAS vs accuracy",
                                  description="A table of VAS reports (the first is the reference for the relative "
                                              "change) and, with --accuracy, Pearson r, its p-value and a scatter "
                                              "plot.")
    compare.add_argument("reports", nargs="+", help="report.json files or folders written by `avar vas`")
    compare.add_argument("--accuracy", default=None,
                         help='accuracies: JSON {"name": accuracy} or CSV with columns name,accuracy '
                              '(name = report name or path)')
    compare.add_argument("--out", dest="compare_out", default=None,
                         help="folder for compare.md, compare.json, vas_vs_accuracy.png")
    compare.add_argument("--overwrite", dest="compare_overwrite", action="store_true",
                         help="replace an earlier comparison in --out (refused otherwise)")
    compare.set_defaults(handler=_compare)
    merge = commands.add_parser("merge", formatter_class=_DEFAULTS,
                                help="join the reports of `avar vas --shard I/N` jobs",
                                description="Exact merge of data-sharded VAS reports (same checkpoint and settings, "
                                            "disjoint samples) into one report with its figures.")
    merge.add_argument("reports", nargs="+", help="report.json files or folders of the shards")
    merge.add_argument("--out", dest="merge_out", required=True, help="output folder of the merged report")
    merge.add_argument("--overwrite", dest="merge_overwrite", action="store_true",
                       help="replace the report of an earlier merge in --out")
    merge.set_defaults(handler=_merge)
    vas.set_defaults(handler=_vas)

    intervene = subparsers.add_parser(
        "intervene",
        help="generate with the attention intervention (docs/method.md, 'Training-free intervention') "
             "and grade the answers",
        description="Rescale pre-softmax logits by key role on the queries after the image (generated tokens "
                    "included) in a layer set, generate greedily with the KV cache, grade with math-verify. "
                    "Settings: the defaults of megatron_avar/analysis/run_intervene.py (InterveneConfig), then "
                    "--config FILE.yaml, then KEY=VALUE overrides, then the flags (a flag left out changes nothing).")
    add = intervene.add_argument
    add("--config", default=None, help="YAML config (see examples/vas/); flags and KEY=VALUE override it")
    add("overrides", nargs="*", metavar="KEY=VALUE",
        help="overrides of InterveneConfig fields, e.g. max_new_tokens=1024")
    _add_model_options(intervene, with_defaults=False)
    add("--out", help="output JSON file (a sweep also writes <stem>.md and <stem>.png)")
    add("--alpha-img", type=float, help="IMAGE keys: z*(1+a) or z+log(1+a) (0.15)")
    add("--alpha-sys", type=float, help="SYSTEM keys: z*(1-a) or z+log(1-a) (0.05)")
    add("--layers", help="decoder layers: middle (8-13 of 28, scaled to the model; the default), all, A-B or i,j,k")
    add("--mode", choices=("multiplicative", "additive"), help="edit form (multiplicative)")
    add("--queries", choices=("user_text_and_response", "all_after_image"),
        help="edited query rows after the first image (user_text_and_response)")
    add("--keep-sink", action="store_true", default=None, help="do not edit the sink key (position 0)")
    add("--num-samples", type=int, help="use the first N records (default: all)")
    add("--max-new-tokens", type=int, help="generation budget per answer (512)")
    add("--sweep", action="store_true", default=None,
        help="baseline + alpha_sys in --sweep-alpha-sys x layer sets in --sweep-layers")
    add("--sweep-alpha-sys", help="comma-separated alpha_sys values (0,0.05,0.4,0.6)")
    add("--sweep-layers", help="layer sets separated by ';' (middle;all)")
    add("--overwrite", action="store_true", default=None, help="replace the results of an earlier run at --out")
    add("--print-config", action="store_true", help="print the resolved config and exit")
    intervene.set_defaults(handler=_intervene)


# avar intervene flag dest -> InterveneConfig field
_INTERVENE_FLAGS = {
    "model": "model", "data": "data", "out": "out", "alpha_img": "alpha_img", "alpha_sys": "alpha_sys",
    "layers": "layers", "mode": "mode", "queries": "queries", "num_samples": "num_samples",
    "max_new_tokens": "max_new_tokens", "batch_size": "batch_size", "device": "device", "dtype": "dtype",
    "device_map": "device_map", "impl": "impl", "sweep": "sweep", "overwrite": "overwrite",
}


def resolve_intervene_config(args):
    """The InterveneConfig of parsed `avar intervene` arguments (defaults < --config < KEY=VALUE < flags)."""
    import json

    from megatron_avar.analysis.run_intervene import InterveneConfig
    from megatron_avar.config import apply_overrides, config_from_dict, flag_overrides, read_config_file

    values = read_config_file(args.config)
    flags = flag_overrides(args, _INTERVENE_FLAGS)
    if args.keep_sink:
        flags.append("edit_sink=false")
    if args.sweep_alpha_sys is not None:
        try:
            alphas = [float(a) for a in args.sweep_alpha_sys.split(",") if a.strip()]
        except ValueError:
            raise ValueError(f"--sweep-alpha-sys {args.sweep_alpha_sys!r}: give comma-separated numbers like "
                             "0,0.05,0.4") from None
        flags.append(f"sweep_alpha_sys={json.dumps(alphas)}")
    if args.sweep_layers is not None:
        layer_sets = [s.strip() for s in args.sweep_layers.split(";")]
        if not all(layer_sets):
            raise ValueError(f"--sweep-layers {args.sweep_layers!r} has an empty layer set: separate the sets with "
                             "one ';' (e.g. 'middle;all')")
        flags.append(f"sweep_layers={json.dumps(layer_sets)}")
    values = apply_overrides(values, list(args.overrides) + flags)
    missing = [f"--{key.replace('_', '-')}" for key in ("model", "data", "out") if values.get(key) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}; usage: avar intervene --model DIR --data FILE --out FILE.json "
                         "(or model:/data:/out: in --config)")
    config = config_from_dict(InterveneConfig, values)
    _check_sweep_settings(values, sweep=config.sweep)
    return config


def _check_sweep_settings(values, *, sweep: bool) -> None:
    """ValueError when a setting would be ignored, naming where it was set (the config file's line, a KEY=VALUE or a
    flag): a sweep runs every sweep_alpha_sys value on every sweep_layers set, not alpha_sys / layers; a single run
    alpha_sys at layers, not the grid."""
    def named(keys):
        return [f"{key} ({values.origins.get(key, 'set')})" for key in keys if key in values]

    single, grid = named(("alpha_sys", "layers")), named(("sweep_alpha_sys", "sweep_layers"))
    if sweep and single:
        raise ValueError(f"{' and '.join(single)} set one intervention, but this run is a sweep (sweep: true, "
                         f"{values.origins.get('sweep', 'set')}) of every sweep_alpha_sys value on every sweep_layers "
                         "set: set those instead (--sweep-alpha-sys, --sweep-layers), or sweep=false")
    if not sweep and grid:
        raise ValueError(f"{' and '.join(grid)} set a sweep's grid, but this run is a single intervention: add "
                         "--sweep, or set alpha_sys / layers (--alpha-sys, --layers)")


def _require(args, names: tuple[str, ...], usage: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}; usage: {usage}")


def _vas_options(args) -> dict:
    """The `avar vas` flags given (not None), by VASConfig field: each flag of `avar vas` is one field."""
    from dataclasses import fields

    from megatron_avar.analysis.run_vas import VASConfig

    values = {field.name: getattr(args, field.name, None) for field in fields(VASConfig)}
    return {name: value for name, value in values.items() if value is not None}


def _refuse_vas_options(args, command: str, usage: str) -> None:
    """ValueError naming the `avar vas` flags given before `compare` / `merge` (except --overwrite, which means the
    same to them): they read reports, and would ignore a setting of the run that computes one."""
    given = [f"--{name.replace('_', '-')}" for name in _vas_options(args) if name != "overwrite"]
    if given:
        raise ValueError(f"`avar vas {command}` does not use {', '.join(given)} (options of `avar vas` itself, given "
                         f"before `{command}`); remove {'it' if len(given) == 1 else 'them'}. Usage: {usage}")


def _vas(args) -> int:
    from megatron_avar.analysis.run_vas import VASConfig, run_vas

    _require(args, ("model", "data", "out"),
             "avar vas --model DIR --data FILE --out DIR (or avar vas compare REPORT...)")
    config = VASConfig(**_vas_options(args))
    report = run_vas(config)
    if report["num_samples"] == 0:  # a shard of records without VAS queries: its state is written for the merge
        return 0
    included, excluded = report["variants"]["sink_included"], report["variants"].get("sink_excluded")
    print(f"VAS {included['vas']:.4f} (K_sys with the sink)"
          + ("" if excluded is None else f", {excluded['vas']:.4f} (without the sink)")
          + f"; top-level numbers {'without' if config.exclude_sink else 'with'} the sink: "
          f"ratio of means {report['ratio_of_means']:.4f}, image share {report['image_share']:.4f} "
          f"over {report['num_samples']} samples ({len(report['skipped_sample_ids'])} without VAS queries skipped); "
          f"wrote {args.out}/report.json and figures")
    return 0


def _compare(args) -> int:
    from megatron_avar.analysis.compare import compare_reports

    _refuse_vas_options(args, "compare", "avar vas compare REPORT... [--accuracy FILE] [--out DIR] [--overwrite]")
    result = compare_reports(args.reports, args.accuracy, args.compare_out,
                             overwrite=args.compare_overwrite or bool(args.overwrite))
    sys.stdout.write(result["markdown"])
    return 0


def _merge(args) -> int:
    from megatron_avar.analysis.run_vas import merge_vas_reports

    _refuse_vas_options(args, "merge", "avar vas merge REPORT... --out DIR [--overwrite]")
    report = merge_vas_reports(args.reports, args.merge_out, overwrite=args.merge_overwrite or bool(args.overwrite))
    print(f"merged {len(args.reports)} reports: VAS {report['vas']:.4f} over {report['num_samples']} samples; "
          f"wrote {args.merge_out}/report.json and figures")
    return 0


def _intervene(args) -> int:
    from megatron_avar.analysis.run_intervene import run_intervene
    from megatron_avar.config import config_to_dict

    config = resolve_intervene_config(args)
    if args.print_config:
        import json

        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    written = run_intervene(config)
    if config.sweep:
        stem = config.out[:-len(".json")]
        print(f"baseline accuracy {written['baseline']['accuracy']}; {len(written['rows'])} settings; "
              f"wrote {config.out}, {stem}.md, {stem}.png")
    else:
        print(f"accuracy {written['accuracy']} over {written['num_graded']} graded samples; wrote {config.out}")
    return 0
