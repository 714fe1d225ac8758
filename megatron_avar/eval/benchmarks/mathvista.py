"""MathVista testmini (`AI4Math/MathVista`, split ``testmini``, 1000 items; docs/evaluation.md, 'MathVista').

Row schema: pid, question, image (a path), decoded_image (Image), choices (list or None), unit, precision
(float or None), answer (str), question_type ("multi_choice" | "free_form"), answer_type ("text" |
"integer" | "float" | "list"), metadata {task, skills, ...}, query (Hint + Question + Choices).

Prompt: the image, then ``query`` verbatim (VLMEvalKit's default prompt for Qwen2.5-VL).

Scoring (offline MathVista rules; with ``--judge`` VLMEvalKit's GPT extractor reads their failures):
- multi_choice: the letter :func:`mcq_letter` finds maps to its option text; without a letter, the cue
  answer (boxed / "answer is") maps to the nearest option by edit distance (the official normalisation);
  with neither, an extraction failure. Correct when the option text equals ``answer``.
- integer: the cue answer, a short answer or the last number, parsed (LaTeX and fractions with
  math-verify), then int(); float: rounded to ``precision`` decimals; both compared as strings (an infinite
  value is a wrong answer).
- text: lowercased stripped string equality, ``\\text{…}`` unwrapped; list: math-verify equivalence.
Breakdown: accuracy per ``metadata.task``.
"""

from __future__ import annotations

import math
import re

from megatron_avar.eval.answers import free_form_candidate, mcq_letter, option_letters
from megatron_avar.eval.benchmarks.base import Benchmark, Judgement, Sample
from megatron_avar.eval.data import to_pil
from megatron_avar.eval.judge_prompts import math_extraction_prompt
from megatron_avar.grading import cue_answer, edit_distance, math_equal, to_number

__all__ = ["MathVista"]

_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")


class MathVista(Benchmark):
    name = "mathvista"
    hub_name = "AI4Math/MathVista"
    split = "testmini"
    local_dir = "mathvista"
    paper_column = "MathVista"
    breakdown_key = "task"

    def build(self, row: dict, config: str | None) -> Sample:
        image = row.get("decoded_image") or row.get("image")
        metadata = row.get("metadata") or {}
        choices = list(row.get("choices") or [])
        target = {
            "answer": str(row["answer"]),
            "question_type": row["question_type"],
            "answer_type": row["answer_type"],
            "choices": choices,
            "precision": row.get("precision"),
            "task": metadata.get("task"),
        }
        content = [{"type": "image", "image": to_pil(image)}, {"type": "text", "text": row["query"]}]
        return Sample(id=str(row["pid"]), content=content, target=target)

    def judge(self, answer: str, target: dict) -> Judgement:
        kind = target["answer_type"]
        if target["question_type"] == "multi_choice":
            options = dict(zip(option_letters(len(target["choices"])), target["choices"]))
            letter = mcq_letter(answer, options)
            if letter is not None:
                return Judgement(letter, options[letter] == target["answer"])
            cue = cue_answer(answer)
            if cue is None:
                return Judgement(None, False)
            nearest = min(options, key=lambda k: (edit_distance(cue.lower(), options[k].lower()), k))
            return Judgement(nearest, options[nearest] == target["answer"])
        candidate = free_form_candidate(answer, numeric=kind in ("integer", "float"))
        if candidate is None:
            return Judgement(None, False)
        if kind in ("integer", "float"):
            value = to_number(candidate)
            if value is None:
                return Judgement(None, False)
            if not math.isfinite(value):  # "\\infty", "10^{1000}": an answer, and not the gold number
                return Judgement(candidate, False)
            gold = float(target["answer"])
            if kind == "integer":
                return Judgement(str(int(value)), str(int(value)) == str(int(gold)))
            digits = int(target["precision"] or 0)
            predicted = f"{round(value, digits):.{digits}f}"
            return Judgement(predicted, predicted == f"{round(gold, digits):.{digits}f}")
        if kind == "list":
            return Judgement(candidate, math_equal(target["answer"], candidate))
        text = _LATEX_TEXT.sub(r"\1", candidate).strip()  # "\\text{Yes}" is the word Yes
        return Judgement(text, text.lower().rstrip(".") == target["answer"].strip().lower())

    def judge_prompt(self, prompt_text: str, answer: str, target: dict) -> str:
        # VLMEvalKit's MathVista_auxeval: the question is the TSV's `query`, i.e. our prompt text
        return math_extraction_prompt(prompt_text.replace("<image>", "").strip(), answer, style="mathvista")

