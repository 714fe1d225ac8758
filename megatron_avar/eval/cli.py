"""`avar eval`: evaluate an HF Qwen2.5-VL checkpoint on the seven AVAR benchmarks (or re-score a run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ALL_BENCHMARKS = "mathvista,mathvision,mathverse_vo,mmmu,mmmu_pro,mmstar,hallusionbench"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on MathVista, MathVision, MathVerse-VO, MMMU, MMMU-Pro, MMStar, HallusionBench",
        description="Generate answers, score them with VLMEvalKit-style rules (no GPT judge) and write "
                    "predictions/<benchmark>.jsonl, scores.json and results.md to --out. Reruns resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="HF Qwen2.5-VL checkpoint directory (not needed with --score-only)")
    parser.add_argument("--benchmarks", default=ALL_BENCHMARKS, help="comma-separated benchmark names")
    parser.add_argument("--out", required=True, help="output folder (reusing one resumes the run)")
    parser.add_argument("--data-root", default=None,
                        help="folder with one subfolder per benchmark (mathvista/, mathvision/, mathverse/, mmmu/, "
                             "mmmu_pro/, mmstar/, hallusionbench/) holding the hub files")
    parser.add_argument("--allow-hub", action="store_true", help="load a benchmark missing locally from the HF hub")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples of each benchmark")
    parser.add_argument("--mathvision-split", default="test", choices=("test", "testmini"), help="MathVision split")
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="generation backend (vllm: GPU only)")
    parser.add_argument("--max-new-tokens", type=int, default=2048, help="response length limit")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (hf backend)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --do-sample)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="image min pixels (default: the checkpoint's; VLMEvalKit uses 1003520 = 1280*28*28)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="image max pixels (default: the checkpoint's; VLMEvalKit uses 12845056 = 16384*28*28)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (auto: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism")
    parser.add_argument("--score-only", action="store_true", help="re-score the predictions in --out without generating")
    parser.set_defaults(handler=_eval)


def _eval(args) -> int:
    from megatron_avar.eval.generation import GenerationConfig
    from megatron_avar.eval.runner import EvalConfig, run_eval, score_run

    benchmarks = tuple(name.strip() for name in args.benchmarks.split(",") if name.strip())
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size,
        min_pixels=args.min_pixels, max_pixels=args.max_pixels, dtype=args.dtype, backend=args.backend,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    config = EvalConfig(
        model=args.model, benchmarks=benchmarks, out=Path(args.out),
        data_root=None if args.data_root is None else Path(args.data_root), allow_hub=args.allow_hub,
        limit=args.limit, mathvision_split=args.mathvision_split, generation=generation,
    )
    if args.score_only:
        scores = score_run(config.out, config.benchmarks, mathvision_split=config.mathvision_split)
    else:
        scores = run_eval(config)
    print((Path(args.out) / "results.md").read_text())
    print(json.dumps({name: s["score"] for name, s in scores["benchmarks"].items()}, indent=2))
    return 0
