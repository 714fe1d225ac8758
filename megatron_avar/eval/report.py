"""scores.json and the results table (Markdown) with the paper's rows beside ours.

The table has one column per benchmark in the paper's order plus the average over the seven, and the
paper's Qwen2.5-VL-7B and AVAR-Thinker rows (docs/evaluation.md, 'The results table') above the evaluated model.
Headline numbers:
MMMU-Pro = mean(standard-10, vision); HallusionBench = mean(aAcc, fAcc, qAcc) (VLMEvalKit's single number;
which metric the paper's 50.7 is remains unknown, docs/evaluation.md, 'HallusionBench'), with all three listed below the
table. The average is left empty unless all seven benchmarks were evaluated.

With an answer judge (`avar eval --judge`, `megatron_avar.eval.judge`) our row appears twice, "rule" (the
judge ignored) and "rule+judge", followed by a table of both scores per benchmark with the judge's counts:
items sent to it, answers it extracted, items it also found no answer in, and failed requests (those items
count as wrong). In scores.json each benchmark's ``score`` stays the rule score; ``with_judge`` holds the
rule+judge summary and ``judge`` the counts. A benchmark without judged scores (a run judged only some:
`avar eval --score-only --benchmarks X --judge J` keeps the others as they were) has an empty rule+judge cell,
is left out of the judge's table, and the table says so.
"""

from __future__ import annotations

from pathlib import Path

from megatron_avar import atomic_files
from megatron_avar.eval.benchmarks import BENCHMARKS

__all__ = ["PAPER_ROWS", "TABLE_HEADER", "results_table", "write_report", "read_scores"]

# docs/method.md, 'Paper results', in BENCHMARKS order: MathVista, MathVision, MathVerse-VO, MMMU, MMMU-Pro, MMStar,
# HallusionBench, then the paper's average.
PAPER_ROWS = {
    "Qwen2.5-VL-7B (paper)": (68.2, 25.2, 41.1, 58.1, 38.3, 62.1, 50.7, 49.1),
    "AVAR-Thinker-7B (paper)": (74.7, 37.4, 50.4, 63.8, 42.9, 64.1, 59.5, 56.1),
}


# the first line of every results.md (how a later run tells its own report from a file of the user's)
TABLE_HEADER = "| model | " + " | ".join(b.paper_column for b in BENCHMARKS.values()) + " | Avg |"


def _cell(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _our_row(name: str, summaries: dict[str, dict], score=lambda summary: summary["score"]) -> str:
    ours = [score(summaries[n]) if n in summaries else None for n in BENCHMARKS]
    scored = [v for v in ours if v is not None]
    whole = len(scored) == len(ours) and not any("partial" in summary for summary in summaries.values())
    average = sum(scored) / len(scored) if whole else None  # (no average over a partial benchmark)
    return f"| {name} | " + " | ".join(_cell(v) for v in ours + [average]) + " |"


def _judged_score(summary: dict) -> float | None:
    """A benchmark's rule+judge score; None where it was not judged."""
    return summary["with_judge"]["score"] if "with_judge" in summary else None


def _judge_lines(summaries: dict[str, dict], judge: dict) -> list[str]:
    lines = [f"\nAnswer judge `{judge['model']}` ({judge['url']}, VLMEvalKit's prompts {judge['prompt_version']}), "
             "asked only where the rules read no answer:", "",
             "| benchmark | rule | rule+judge | sent to judge | judge extracted | judge also failed | judge errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    judged = [name for name in BENCHMARKS if name in summaries and "with_judge" in summaries[name]]
    for name in judged:
        s, c = summaries[name], summaries[name]["judge"]
        lines.append(f"| {BENCHMARKS[name].paper_column} | {_cell(s['score'])} | {_cell(s['with_judge']['score'])} "
                     f"| {c['judged']} | {c['extracted']} | {c['no_answer']} | {c['errors']} |")
    if any(summaries[n]["judge"]["errors"] for n in judged):
        lines.append("\nJudge errors are requests that failed for good; their items count as wrong in rule+judge.")
    unjudged = [BENCHMARKS[name].paper_column for name in BENCHMARKS if name in summaries and name not in judged]
    if unjudged:
        lines.append(f"\nNot judged: {', '.join(unjudged)} (rule scores only; `avar eval --score-only --benchmarks "
                     "NAME --judge JUDGE.yaml` judges one).")
    return lines


def results_table(summaries: dict[str, dict], model_name: str, *, limit: int | None = None,
                  judge: dict | None = None, intervened: bool = False) -> str:
    """The Markdown results table (see the module docstring) plus per-benchmark detail lines. judge: the
    judge's description (`AnswerJudge.describe`) when the summaries carry judged scores (some may not). intervened:
    the answers were generated with the training-free intervention (the VAS line then says it is the model's own)."""
    names = list(BENCHMARKS)
    lines = [TABLE_HEADER, "|---|" + "---:|" * (len(names) + 1)]
    for row_name, values in PAPER_ROWS.items():
        lines.append(f"| {row_name} | " + " | ".join(_cell(v) for v in values) + " |")
    if judge is None:
        lines.append(_our_row(model_name, summaries))
    else:
        lines.append(_our_row(f"{model_name}, rule", summaries))
        lines.append(_our_row(f"{model_name}, rule+judge", summaries, _judged_score))
    lines.append("")
    for name in names:
        if name not in summaries:
            continue
        s = summaries[name]
        detail = (f"- {BENCHMARKS[name].paper_column}: n={s['num_samples']}, "
                  f"extraction failures {s['extraction_failure_rate']:.1f}%, "
                  f"unclosed <think> {s['format_failure_rate']:.1f}%")
        if name == "hallusionbench":
            detail += f"; aAcc {s['aAcc']:.1f}, fAcc {s['fAcc']:.1f}, qAcc {s['qAcc']:.1f} (score = their mean)"
        if name == "mmmu_pro":
            settings = ", ".join(f"{k} {v:.1f}" for k, v in s["by_setting"].items())
            detail += f"; {settings} (score = {s['headline']})"
        if "partial" in s:
            detail += f"; **partial: generation has not finished** ({s['partial']})"
        lines.append(detail)
    with_vas = [n for n in names if n in summaries and "vas" in summaries[n]]
    if with_vas:
        lines.append("\nVisual Attention Score (prompt-only prefill, all layers and heads; docs/method.md"
                     + ("; of the model without the intervention the answers were generated with" if intervened else "")
                     + "): "
                     + ", ".join(f"{BENCHMARKS[n].paper_column} {summaries[n]['vas']['vas']:.3f} "
                                 f"(n={summaries[n]['vas']['num_samples']})" for n in with_vas))
    if judge is not None:
        lines += _judge_lines(summaries, judge)
    if limit is not None:
        lines.append(f"\nOnly the first {limit} samples per benchmark were evaluated: not comparable with the "
                     "paper's rows.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, summaries: dict[str, dict], run_config: dict, *, judge: dict | None = None) -> dict:
    """Write ``out/scores.json`` and ``out/results.md``; return the scores dict. run_config: the folder's
    run_config.json (model, generation, limit; {} for none). judge: as for :func:`results_table`."""
    model = run_config.get("model") or "evaluated model"
    scores = {"model": model, "generation": run_config.get("generation"), "benchmarks": summaries}
    if all(name in summaries and "partial" not in summaries[name] for name in BENCHMARKS):
        scores["average"] = round(sum(summaries[n]["score"] for n in BENCHMARKS) / len(BENCHMARKS), 2)
        if judge is not None and all("with_judge" in summaries[n] for n in BENCHMARKS):
            scores["average_with_judge"] = round(
                sum(summaries[n]["with_judge"]["score"] for n in BENCHMARKS) / len(BENCHMARKS), 2)
    if judge is not None:
        scores["judge"] = judge
    atomic_files.write_json(out / "scores.json", scores)
    limit = run_config.get("limit")
    atomic_files.write_text(out / "results.md",
                            results_table(summaries, f"ours: {Path(model).name}", limit=limit, judge=judge,
                                          intervened=bool((run_config.get("generation") or {}).get("intervene"))))
    return scores


def read_scores(out: Path) -> dict:
    """The scores.json an earlier scoring wrote into ``out`` ({} when there is none, or it is not one: scoring
    replaces it, so a damaged one only means there is nothing to keep from it)."""
    import json

    try:
        scores = json.loads((out / "scores.json").read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(scores, dict) or not isinstance(scores.get("benchmarks"), dict):
        return {}
    return scores
