"""MathVerse, vision-only (`AI4Math/MathVerse`, config and split ``testmini``: 3940 rows = 788 problems x 5
versions; the vision-only subset is the 788 rows with ``problem_version == "Vision Only"``;
docs/evaluation.md, 'MathVerse vision-only').

Row schema: sample_index, problem_index, problem_version, question, image (Image), answer, question_type
("multi-choice" | "free-form"), metadata {split, source, subject, subfield}, query_wo, query_cot,
question_for_eval. In the vision-only version the whole problem, choices included, is drawn in the image.

Prompt: the image, then ``query_wo`` (the direct-answer instruction, VLMEvalKit's TSV question).

Scoring (offline; VLMEvalKit uses two GPT calls, extract then grade; ``--judge`` makes the first for the rules'
failures): multi-choice: the letter (A-E) :func:`mcq_letter` finds
equals the gold letter. Free-form: the cue answer, a short answer or the last number equals the gold answer
by :func:`math_equal` (units, degree signs and ``$`` removed, numeric tolerance 1e-6 relative, LaTeX via
math-verify). Breakdown: accuracy per ``metadata.subject``.
"""

from __future__ import annotations

from megatron_avar.eval.answers import free_form_candidate, mcq_letter, option_letters
from megatron_avar.eval.benchmarks.base import Benchmark, Judgement, Sample
from megatron_avar.eval.data import to_pil
from megatron_avar.eval.judge_prompts import mathverse_extraction_prompt
from megatron_avar.grading import math_equal, to_number

__all__ = ["MathVerseVisionOnly"]

VISION_ONLY = "Vision Only"


class MathVerseVisionOnly(Benchmark):
    name = "mathverse_vo"
    hub_name = "AI4Math/MathVerse"
    configs = ("testmini",)
    config_subdir = False  # DATA_ROOT/mathverse/testmini*.parquet (or a testmini/ save_to_disk folder)
    split = "testmini"
    local_dir = "mathverse"
    paper_column = "MathVerse-VO"
    breakdown_key = "subject"

    def keep(self, row: dict) -> bool:
        return row["problem_version"] == VISION_ONLY

    def build(self, row: dict, config: str | None) -> Sample:
        metadata = row.get("metadata") or {}
        target = {"answer": str(row["answer"]).strip(), "question_type": row["question_type"],
                  "subject": metadata.get("subject"), "question_for_eval": row.get("question_for_eval")}
        content = [{"type": "image", "image": to_pil(row["image"])}, {"type": "text", "text": row["query_wo"]}]
        return Sample(id=str(row.get("sample_index", row["problem_index"])), content=content, target=target)

    def judge(self, answer: str, target: dict) -> Judgement:
        if target["question_type"] == "multi-choice":
            gold = target["answer"].strip("()").strip()
            letter = mcq_letter(answer, dict.fromkeys(option_letters(5), ""))
            return Judgement(letter, letter == gold)
        candidate = free_form_candidate(answer, numeric=to_number(target["answer"]) is not None)
        return Judgement(candidate, candidate is not None and math_equal(target["answer"], candidate))

    def judge_prompt(self, prompt_text: str, answer: str, target: dict) -> str:
        # VLMEvalKit's extraction call only; its second call (a GPT 0/1 grade) is replaced by judge() above
        return mathverse_extraction_prompt(answer)
