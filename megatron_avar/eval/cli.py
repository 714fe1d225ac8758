"""`avar eval`: evaluate an HF Qwen2.5-VL checkpoint on the seven AVAR benchmarks (or re-score a run).

Settings come from `megatron_avar.eval.runner.EvalConfig` (and its ``generation`` section,
`megatron_avar.eval.generation.GenerationConfig`): documented defaults, then ``--config FILE.yaml``, then
dotted ``KEY=VALUE`` overrides, then the flags below (each flag sets one config field; a flag left out
leaves the field alone).
"""

from __future__ import annotations

import dataclasses
import json
import sys

# flag dest -> dotted config key
_FLAG_KEYS = {
    "model": "model", "benchmarks": "benchmarks", "out": "out", "data_root": "data_root", "allow_hub": "allow_hub",
    "limit": "limit", "mathvision_split": "mathvision_split", "backend": "generation.backend",
    "max_new_tokens": "generation.max_new_tokens", "batch_size": "generation.batch_size",
    "do_sample": "generation.do_sample", "temperature": "generation.temperature", "top_p": "generation.top_p",
    "top_k": "generation.top_k", "seed": "generation.seed", "min_pixels": "generation.min_pixels",
    "max_pixels": "generation.max_pixels", "dtype": "generation.dtype",
    "tensor_parallel_size": "generation.tensor_parallel_size", "max_model_len": "generation.max_model_len",
    "num_shards": "num_shards", "shard_index": "shard_index",
    "vas_samples": "vas_samples", "intervene": "generation.intervene", "alpha_img": "generation.alpha_img",
    "alpha_sys": "generation.alpha_sys",
    "intervene_mode": "generation.intervene_mode", "intervene_layers": "generation.intervene_layers",
    "judge": "judge",
}
# What --score-only reads (the folder, which benchmarks, how MathVision's samples are defined, the judge): every other
# field (model, data, generation, sharding, VAS) only applies to generating, so a flag or KEY=VALUE setting it would be
# ignored. A --config file's values are not checked: one file may serve the generating run and its scoring.
_SCORING_KEYS = ("out", "benchmarks", "mathvision_split", "judge")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on MathVista, MathVision, MathVerse-VO, MMMU, MMMU-Pro, MMStar, HallusionBench",
        description="Generate answers, score them with VLMEvalKit-style rules (and, with --judge, a chat-model "
                    "answer judge for what the rules cannot read) and write predictions/<benchmark>.jsonl, "
                    "scores.json and results.md to --out. Reruns resume. Defaults: megatron_avar/eval/runner.py "
                    "(EvalConfig), generation.py (GenerationConfig) and judge.py (JudgeConfig).",
    )
    add = parser.add_argument
    add("--config", default=None, help="YAML config (see examples/eval/); flags and KEY=VALUE override it")
    add("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. generation.max_new_tokens=1024")
    add("--model", help="HF Qwen2.5-VL checkpoint directory (generating runs; not with --score-only)")
    add("--benchmarks", help="comma-separated names (default: all seven: mathvista,mathvision,mathverse_vo,mmmu,"
                             "mmmu_pro,mmstar,hallusionbench; with --score-only: those with predictions in --out). "
                             "Only these are scored and judged (--judge); the folder's other finished benchmarks "
                             "stay in its scores as they were")
    add("--out", help="output folder (reusing one resumes the run)")
    add("--data-root", help="folder with one subfolder per benchmark (mathvista/, mathvision/, mathverse/, mmmu/, "
                            "mmmu_pro/, mmstar/, hallusionbench/) holding the hub files")
    add("--allow-hub", action="store_true", default=None, help="load a benchmark missing locally from the HF hub")
    add("--limit", type=int, help="evaluate only the first N samples of each benchmark (MMMU-Pro: of each setting)")
    add("--mathvision-split", choices=("test", "testmini"), help="MathVision split (default: test, the paper's)")
    add("--backend", choices=("hf", "vllm"), help="generation backend (default: hf; vllm: GPU only)")
    add("--max-new-tokens", type=int, help="response length limit (default: 2048)")
    add("--batch-size", type=int, help="prompts per generate call, hf backend (default: 1)")
    add("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    add("--temperature", type=float, help="sampling temperature (default: 1.0)")
    add("--top-p", type=float, help="nucleus sampling (default: 1.0)")
    add("--top-k", type=int, help="top-k sampling, 0 = off (default: 0)")
    add("--seed", type=int, help="sampling seed (default: 0)")
    add("--min-pixels", type=int, help="image min pixels (default: the checkpoint's; VLMEvalKit: 1003520 = 1280*28*28)")
    add("--max-pixels", type=int,
        help="image max pixels (default: the checkpoint's; VLMEvalKit: 12845056 = 16384*28*28)")
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
        help="weights (default: auto = bf16 on GPU, fp32 on CPU)")
    add("--tensor-parallel-size", type=int, help="vLLM tensor parallelism (default: 1)")
    add("--max-model-len", type=int,
        help="vLLM: tokens of prompt + response it reserves memory for (default: 0 = the longest prompt to generate + "
             "--max-new-tokens, counted from the data before vLLM starts; a prompt that does not fit is named)")
    add("--vas-samples", type=int, help="also compute VAS on the first N samples of each benchmark (hf backend; "
                                        "default: 0 = off)")
    add("--intervene", action="store_true", default=None,
        help="apply the training-free attention intervention while generating (hf backend; the causal check)")
    add("--alpha-img", type=float, help="intervention: gain on IMAGE keys (default: 0.15)")
    add("--alpha-sys", type=float, help="intervention: reduction on SYSTEM keys (default: 0.05)")
    add("--intervene-mode", choices=("multiplicative", "additive"), help="intervention mode (default: multiplicative)")
    add("--intervene-layers", help="intervention layers: middle, all, A-B or i,j (default: middle)")
    add("--num-shards", type=int, help="data parallelism: split every benchmark over N processes (default: 1)")
    add("--shard-index", type=int, help="this process's shard in [0, N) (default: 0); --score-only when all are done")
    add("--judge", metavar="JUDGE.yaml", help="answer judge config (see examples/eval/judge.yaml): an OpenAI-"
                                             "compatible model extracts the answers the rules could not read, as "
                                             "VLMEvalKit's GPT judge does; both scores are reported (default: rules "
                                             "only)")
    add("--score-only", action="store_true", help="re-score the predictions in --out without generating (with "
                                                  "--benchmarks: only those; the others' scores are kept). Takes "
                                                  "--out, --benchmarks, --mathvision-split, --judge, --allow-partial; "
                                                  "the generating flags are refused")
    add("--allow-partial", action="store_true",
        help="with --score-only: score benchmarks whose generation has not finished (a shard still running or never "
             "run); their scores say they are partial")
    add("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(handler=_eval)


def resolve_config(args):
    """The EvalConfig of parsed ``avar eval`` arguments (defaults < --config < KEY=VALUE < flags)."""
    from megatron_avar.config import apply_overrides, config_from_dict, flag_overrides, read_config_file
    from megatron_avar.eval.runner import EvalConfig

    values = read_config_file(args.config)
    flags = flag_overrides(args, {dest: key for dest, key in _FLAG_KEYS.items() if dest != "benchmarks"})
    if args.benchmarks is not None:  # comma-separated on the command line, a list in the config
        flags.append(f"benchmarks={json.dumps([name.strip() for name in args.benchmarks.split(',') if name.strip()])}")
    values = apply_overrides(values, list(args.overrides) + flags)
    if args.score_only:  # (after apply_overrides, which names a malformed KEY=VALUE)
        _refuse_generation_settings(args)
    if "out" not in values:
        raise ValueError("an output folder is needed: --out DIR (or out: in the config)")
    config = config_from_dict(EvalConfig, values)
    if args.score_only and not config.out.is_dir():  # (else: "no predictions for mathvista", naming no folder)
        problem = "is not a folder" if config.out.exists() else "does not exist"
        raise ValueError(f"--out {config.out} {problem}: --score-only scores the predictions an earlier `avar eval` "
                         "wrote there; give that run's folder")
    if args.score_only and "benchmarks" not in values:
        from megatron_avar.eval.runner import folder_benchmarks

        # scoring a folder: its finished benchmarks (a folder of one is not asked for the six it never ran)
        chosen, notes = folder_benchmarks(config.out, allow_partial=args.allow_partial)
        if notes and not chosen:
            raise ValueError(f"nothing finished to score in {config.out}: {'; '.join(notes.values())}; finish the "
                             "generation (the same `avar eval` command resumes), or score the part with "
                             "--allow-partial")
        if not chosen:
            raise ValueError(f"no predictions to score in {config.out / 'predictions'}; generate them first "
                             f"(`avar eval --model DIR --out {config.out}`), or give the folder of the run to score")
        config = dataclasses.replace(config, benchmarks=tuple(chosen))  # (scoring says which were left out)
    _refuse_unused_split(args, config)
    return config


def _given_settings(args) -> list[tuple[str, str]]:
    """(top-level config key, how the command line set it: the KEY=VALUE override or the flag) of each override and
    flag given, in that order (the --config file's values are not among them)."""
    given = [(override.partition("=")[0].strip().split(".")[0], override) for override in args.overrides]
    return given + [(key.split(".")[0], "--" + dest.replace("_", "-")) for dest, key in _FLAG_KEYS.items()
                    if getattr(args, dest) is not None]


def _refuse_generation_settings(args) -> None:
    """ValueError naming the flags and overrides of a --score-only run that only a generating run uses: scoring reads
    the stored responses, so they would be ignored (a generating run refuses its unused settings too)."""
    unused = [shown for key, shown in _given_settings(args) if key not in _SCORING_KEYS]
    if unused:
        raise ValueError(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} only when generating; "
                         "--score-only re-scores the stored predictions without generating: leave "
                         f"{'it' if len(unused) == 1 else 'them'} out, or drop --score-only to generate")


def _refuse_unused_split(args, config) -> None:
    """ValueError for a --mathvision-split (or mathvision_split=) given to a run without MathVision: it defines
    MathVision's samples only, so it would be ignored."""
    shown = next((shown for key, shown in reversed(_given_settings(args)) if key == "mathvision_split"), None)
    if shown is not None and "mathvision" not in config.benchmarks:
        raise ValueError(f"{shown} applies to mathvision, which this run's benchmarks ({', '.join(config.benchmarks)}) "
                         "leave out: add mathvision to --benchmarks, or leave it out (it would be ignored)")


def _eval(args) -> int:
    from megatron_avar.config import config_to_dict
    from megatron_avar.eval.judge import JudgeFailuresError, load_judge_config
    from megatron_avar.eval.runner import run_eval, score_run

    config = resolve_config(args)
    if args.allow_partial and not args.score_only:
        raise ValueError("--allow-partial applies to --score-only (a generating run scores only what it finished)")
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2, default=str))
        return 0
    root = config.data_root
    # checked before the model loads; with --allow-hub a missing folder means "from the hub" (eval.data.load_split)
    if not args.score_only and root is not None and not root.is_dir() and not (config.allow_hub and not root.exists()):
        problem = "is not a folder" if root.exists() else "does not exist"
        raise ValueError(f"--data-root (data_root) {root} {problem}: give the folder with one subfolder per "
                         "benchmark (mathvista/, mathvision/, ...; see --help), or pass --allow-hub to load the "
                         "benchmarks from the Hugging Face hub")
    try:
        if args.score_only:
            judge = None if config.judge is None else load_judge_config(config.judge)
            scores = score_run(config.out, config.benchmarks, mathvision_split=config.mathvision_split, judge=judge,
                               allow_partial=args.allow_partial)
        else:
            scores = run_eval(config)
            if scores is None:
                judge = "" if config.judge is None else f" --judge {config.judge}"
                print(f"shard {config.shard_index} of {config.num_shards} done; when every shard is, score the run "
                      f"with `avar eval --out {config.out} --benchmarks {','.join(config.benchmarks)} --score-only"
                      f"{judge}`")
                return 0
    except JudgeFailuresError as error:
        # Not a usage error (exit 2, which the top-level CLI gives ValueError): the judge failed; the report is written.
        print((config.out / "results.md").read_text())
        print(f"avar eval: error: {error}", file=sys.stderr)
        return 1
    print((config.out / "results.md").read_text())
    print(json.dumps({name: s["score"] if "with_judge" not in s else {"rule": s["score"],
                                                                       "rule+judge": s["with_judge"]["score"]}
                      for name, s in scores["benchmarks"].items()}, indent=2))
    return 0
