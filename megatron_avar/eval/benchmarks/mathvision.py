"""MathVision (`MathLLMs/MathVision`, split ``test`` 3040 items — the reported "full" set — or ``testmini``
304; docs/evaluation.md, 'MathVision').

Row schema: id, question (may hold ``<image1>`` placeholders), options (list, A-E; empty for free-form),
image (a path), decoded_image (Image), answer (a letter or a value), solution, level, subject.

Prompt: the image, then the question formatted MathVista-style (this mirrors what VLMEvalKit's TSV holds,
as far as it can be inferred from its judge examples):
``Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.``
(free-form: ``Hint: Please answer the question and provide the final answer at the end.``), then
``Question: {question}``, then ``Choices:`` and one ``(A) …`` line per option. ``<imageN>`` placeholders
are removed from the question (the image comes first).

Scoring (the official MATH-V rules, offline): a letter answer is multiple choice: :func:`mcq_letter` (which
also matches an option's text) must give the gold letter. Otherwise free-form: the cue answer (boxed /
"the answer is"), a short answer or the last number, equal to the gold answer by :func:`math_equal`
(numbers with units stripped, LaTeX via math-verify). Breakdown: accuracy per ``subject``.
"""

from __future__ import annotations

import re

from megatron_avar.eval.answers import free_form_candidate, mcq_letter, option_letters
from megatron_avar.eval.benchmarks.base import Benchmark, Judgement, Sample
from megatron_avar.eval.data import to_pil
from megatron_avar.eval.judge_prompts import math_extraction_prompt
from megatron_avar.grading import math_equal, to_number

__all__ = ["MathVision"]

_MCQ_HINT = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
_FREE_HINT = "Hint: Please answer the question and provide the final answer at the end."
_PLACEHOLDER = re.compile(r"<image\d*>")


def mathvision_prompt(question: str, options: list[str]) -> str:
    question = _PLACEHOLDER.sub("", question).strip()
    lines = [_MCQ_HINT if options else _FREE_HINT, f"Question: {question}"]
    if options:
        lines.append("Choices:")
        lines += [f"({letter}) {text}" for letter, text in zip(option_letters(len(options)), options)]
    return "\n".join(lines)


class MathVision(Benchmark):
    name = "mathvision"
    hub_name = "MathLLMs/MathVision"
    split = "test"
    local_dir = "mathvision"
    paper_column = "MathVision"
    breakdown_key = "subject"

    def __init__(self, split: str = "test"):
        if split not in ("test", "testmini"):
            raise ValueError(f"mathvision split must be 'test' (3040, the paper's) or 'testmini' (304), got {split!r}")
        self.split = split

    def build(self, row: dict, config: str | None) -> Sample:
        options = [str(o) for o in (row.get("options") or [])]
        answer = str(row["answer"]).strip()
        is_mcq = bool(re.fullmatch(r"[A-E]", answer))
        target = {"answer": answer, "options": options, "is_mcq": is_mcq, "subject": row.get("subject"),
                  "level": row.get("level")}
        image = row.get("decoded_image") or row.get("image")
        text = mathvision_prompt(row["question"], options)
        return Sample(id=str(row["id"]),
                      content=[{"type": "image", "image": to_pil(image)}, {"type": "text", "text": text}],
                      target=target)

    def judge(self, answer: str, target: dict) -> Judgement:
        if target["is_mcq"]:
            letters = option_letters(max(len(target["options"]), 5))
            texts = target["options"] + [""] * (len(letters) - len(target["options"]))
            letter = mcq_letter(answer, dict(zip(letters, texts)))
            return Judgement(letter, letter == target["answer"])
        candidate = free_form_candidate(answer, numeric=to_number(target["answer"]) is not None)
        return Judgement(candidate, candidate is not None and math_equal(target["answer"], candidate))

    def judge_prompt(self, prompt_text: str, answer: str, target: dict) -> str:
        # VLMEvalKit's MATH_V_auxeval: the question is the TSV's, formatted as our prompt text is
        return math_extraction_prompt(prompt_text.replace("<image>", "").strip(), answer, style="mathvision")
