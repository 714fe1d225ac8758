"""The evaluation loop: generate per benchmark, append predictions as they come, score from the files.

Output folder (``--out``):
    run_config.json              model, generation config, benchmarks (a rerun must match it)
    predictions/<benchmark>.jsonl one line per sample: id, prompt (text, ``<image>`` marks), response, target,
                                 and the judgement at write time (answer_source, extracted, correct)
    scores.json                  per-benchmark summaries (headline ``score``, failure rates, breakdowns)
    results.md                   the results table with the paper's rows (see `megatron_avar.eval.report`)

Resuming: samples whose id is already in the predictions file are skipped, so an interrupted run continues
where it stopped (a half-written last line is dropped). Scores are always recomputed from the stored
responses of the whole file, so scoring the same file twice gives the same numbers, and a rule change
re-scores old runs without generating again.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_avar.eval.benchmarks import BENCHMARKS, get_benchmark
from megatron_avar.eval.generation import GenerationConfig, make_generator

__all__ = ["EvalConfig", "run_eval", "score_run", "read_predictions"]

ALL_BENCHMARKS = tuple(BENCHMARKS)
_VLLM_CHUNK = 256  # prompts handed to vLLM at once (it schedules them itself); also the resume granularity


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    out: output folder. model: HF checkpoint directory (None only to re-score existing predictions).
    benchmarks: CLI names (default: all seven, `megatron_avar.eval.benchmarks.BENCHMARKS`). data_root: the folder holding one
    subfolder per benchmark (`megatron_avar.eval.data`); allow_hub: also try the hub. limit: the first
    ``limit`` samples of each benchmark (None = all). mathvision_split: "test" (the paper's) or "testmini".
    """

    out: Path
    model: str | None = None
    benchmarks: tuple[str, ...] = ALL_BENCHMARKS
    data_root: Path | None = None
    allow_hub: bool = False
    limit: int | None = None
    mathvision_split: str = "test"
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        # values from YAML arrive as str / list: normalise once (the dataclass is frozen afterwards)
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "data_root", None if self.data_root is None else Path(self.data_root))
        object.__setattr__(self, "model", None if self.model is None else str(self.model))
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        if isinstance(self.generation, dict):
            object.__setattr__(self, "generation", GenerationConfig(**self.generation))
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown or not self.benchmarks:
            raise ValueError(f"benchmarks {unknown or '(none)'} unknown; choose from {', '.join(BENCHMARKS)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"benchmarks lists a name twice: {', '.join(self.benchmarks)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all samples), got {self.limit}")
        if self.mathvision_split not in ("test", "testmini"):
            raise ValueError(f"mathvision_split must be 'test' or 'testmini', got {self.mathvision_split!r}")


def read_predictions(path: Path) -> dict[str, dict]:
    """id -> record of a predictions file; a half-written last line (an interrupted run) is dropped from
    the file. A malformed line elsewhere is an error naming it."""
    if not path.is_file():
        return {}
    lines = path.read_text().split("\n")
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no trailing newline: the write was interrupted
                path.write_text("\n".join(lines[:-1]) + ("\n" if number > 1 else ""))
                print(f"{path}: dropped a half-written last line", file=sys.stderr)
                break
            raise ValueError(f"{path}:{number} is not valid JSON ({error}); fix or delete that line") from error
        records[record["id"]] = record
    return records


def _check_run_config(out: Path, config: EvalConfig) -> None:
    """Record the run's model and generation settings; refuse to mix different ones in one folder."""
    path = out / "run_config.json"
    # batch_size may change between greedy runs: greedy outputs do not depend on it (tested); sampled ones do
    generation = {k: v for k, v in config.generation.to_dict().items()
                  if k != "batch_size" or config.generation.do_sample}
    current = {"model": str(config.model), "generation": generation, "mathvision_split": config.mathvision_split}
    if path.is_file():
        previous = json.loads(path.read_text())
        mismatched = [k for k in current if previous.get(k) != current[k]]
        if mismatched:
            raise ValueError(
                f"{out} holds predictions made with different {', '.join(mismatched)} ({path}); resuming would "
                f"mix them. Use another --out, or delete {out} to start over")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**current, "limit": config.limit}, indent=2) + "\n")


def _generate_benchmark(benchmark, config: EvalConfig, get_generator, path: Path) -> int:
    """Generate the samples of one benchmark that the predictions file lacks; returns how many."""
    from tqdm import tqdm

    done = read_predictions(path)
    seen: set[str] = set()
    chunk_size = _VLLM_CHUNK if config.generation.backend == "vllm" else config.generation.batch_size
    pending, written = [], 0
    progress = tqdm(desc=benchmark.name, unit="sample", total=config.limit, file=sys.stderr)

    def flush():
        nonlocal written
        responses = get_generator().generate(pending)
        with path.open("a") as handle:
            for sample, response in zip(pending, responses):
                record = {"id": sample.id, "prompt": sample.prompt_text, "response": response, "target": sample.target}
                record.update(benchmark.evaluate(response, sample.target))
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        written += len(pending)
        progress.update(len(pending))
        pending.clear()

    for sample in benchmark.samples(config.data_root, allow_hub=config.allow_hub, limit=config.limit):
        if sample.id in seen:
            raise ValueError(f"{benchmark.name}: sample id {sample.id!r} occurs twice in the data; ids must be unique")
        seen.add(sample.id)
        if sample.id in done:
            progress.update(1)
            continue
        pending.append(sample)
        if len(pending) >= chunk_size:
            flush()
    if pending:
        flush()
    progress.close()
    return written


def score_run(out: Path, benchmarks: tuple[str, ...], *, mathvision_split: str = "test") -> dict:
    """Score every predictions file of ``benchmarks`` in ``out``; write scores.json and results.md."""
    from megatron_avar.eval.report import write_report

    summaries = {}
    for name in benchmarks:
        path = out / "predictions" / f"{name}.jsonl"
        records = list(read_predictions(path).values())
        if not records:
            raise ValueError(f"no predictions for {name} in {path}; run `avar eval --model ...` first")
        benchmark = get_benchmark(name, mathvision_split=mathvision_split)
        judged = [{"target": r["target"], **benchmark.evaluate(r["response"], r["target"])} for r in records]
        summaries[name] = benchmark.aggregate(judged)
    return write_report(out, summaries)


def run_eval(config: EvalConfig) -> dict:
    """Generate what is missing for every benchmark, then score all of them; returns the scores dict."""
    if config.model is None:
        raise ValueError("a model directory is needed to generate (--model); use --score-only to re-score")
    if not Path(config.model).is_dir():
        raise ValueError(f"--model {config.model} is not a directory; pass an HF Qwen2.5-VL checkpoint folder")
    out = Path(config.out)
    _check_run_config(out, config)
    (out / "predictions").mkdir(exist_ok=True)
    generator = None

    def get_generator():  # loaded only when something is left to generate
        nonlocal generator
        if generator is None:
            generator = make_generator(config.model, config.generation)
        return generator

    for name in config.benchmarks:
        benchmark = get_benchmark(name, mathvision_split=config.mathvision_split)
        written = _generate_benchmark(benchmark, config, get_generator, out / "predictions" / f"{name}.jsonl")
        print(f"{name}: {written} new predictions", file=sys.stderr)
    return score_run(out, config.benchmarks, mathvision_split=config.mathvision_split)
