"""MMMU validation (`MMMU/MMMU`, 30 subject configs, split ``validation``, 900 items; docs/evaluation.md, 'MMMU').

Row schema: id ("validation_<Subject>_<n>"), question (with ``<image k>`` references), options (a Python
list literal string, "[]" for open questions), image_1 .. image_7 (Image or None), answer (a letter, or
a string for open questions, possibly a list literal), question_type ("multiple-choice" | "open"), subfield.

Local layout: ``DATA_ROOT/mmmu/`` holding ``validation-*.parquet`` files anywhere below it — the hub
snapshot's ``<Subject>/validation-*.parquet`` folders, or one flat file. The subjects found are reported
(``num_subjects``), so a partial copy is visible in scores.json.

Prompt (VLMEvalKit's default MCQ prompt): ``Question: {question}``, then ``Options:`` and one
``A. {option}`` line per option, then ``Please select the correct answer from the options above. `` and a
newline; open questions get only the question line. Interleaving: the text is split at every
``<image k>`` (options included) and image k goes there; repeats duplicate the image, unreferenced images
are dropped; a question that references no image gets all its images first.

Scoring (MMMU's official rules, a sound offline choice):
- multiple choice — :func:`parse_choice` (on the last ``\\boxed{}`` first when it holds a letter): ``(X)``,
  else `` X `` as a word, else ``X.``; only when none is found and the response has more than 5 words, an
  option text it contains; with several hits the one mentioned last. With none the official code picks at
  random: we count an extraction failure (wrong; ``--judge``: VLMEvalKit's option-matching judge reads it).
- open — :func:`parse_open`: the text after the last cue word of each sentence ("is", "so", "thus",
  "therefore", "final", "answer", "result", "could be") plus the numbers in it; correct when the gold
  answer (any of them, for a list) is a substring of a candidate, or, for a number, equal to a candidate's
  number (plain or LaTeX) once both are rounded to 2 decimals (the official rule).
Breakdown: accuracy per subject (from the id).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping

from megatron_avar.eval.answers import option_letters
from megatron_avar.eval.benchmarks.base import Benchmark, Judgement, Sample
from megatron_avar.eval.data import to_pil
from megatron_avar.eval.judge_prompts import multiple_choice_prompt
from megatron_avar.grading import last_boxed, numbers_in, to_number

__all__ = ["MMMU", "MMMU_SUBJECTS", "parse_choice", "parse_open", "interleave", "mcq_prompt", "parse_options",
           "choice_judge_prompt"]

MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design",
    "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics", "Energy_and_Power", "Finance",
    "Geography", "History", "Literature", "Manage", "Marketing", "Materials", "Math", "Mechanical_Engineering",
    "Music", "Pharmacy", "Physics", "Psychology", "Public_Health", "Sociology",
)
MMMU_INSTRUCTION = "Please select the correct answer from the options above. \n"
_IMAGE_REF = re.compile(r"<image (\d+)>")


def parse_options(options) -> list[str]:
    """MMMU stores options as a Python list literal string; lists pass through."""
    if isinstance(options, str):
        options = ast.literal_eval(options) if options.strip() else []
    return [str(o) for o in options]


def mcq_prompt(question: str, options: list[str], instruction: str) -> str:
    """``Question: …`` / ``Options:`` / ``A. …`` lines / instruction; open questions (no options): the
    question line only."""
    text = f"Question: {question}\n"
    if options:
        text += "Options:\n" + "".join(f"{k}. {o}\n" for k, o in zip(option_letters(len(options)), options))
        text += instruction
    return text


def interleave(text: str, images: Mapping[int, object]) -> list[dict]:
    """Chat items with image k placed at every ``<image k>`` of ``text`` (see the module docstring)."""
    parts = _IMAGE_REF.split(text)
    if len(parts) == 1:
        return [{"type": "image", "image": images[k]} for k in sorted(images)] + [{"type": "text", "text": text}]
    content: list[dict] = []
    for index, part in enumerate(parts):
        if index % 2 == 1:
            if int(part) not in images:
                raise ValueError(f"the question references <image {part}> but the row has no image_{part}")
            content.append({"type": "image", "image": images[int(part)]})
        elif part:
            content.append({"type": "text", "text": part})
    return content


def parse_choice(response: str, options: dict[str, str]) -> str | None:
    """The option letter of an MCQ response by MMMU's official rules (module docstring), or None."""
    text = " " + response.strip().strip(",.!?;:'\"") + " "
    patterns = ("({})", " {} ", "{}.")
    for pattern in patterns:
        hits = {k: text.rfind(pattern.format(k)) for k in options if pattern.format(k) in text}
        if hits:
            return max(hits, key=hits.__getitem__)
    if len(response.split()) > 5:
        lowered = text.lower()
        hits = {k: lowered.rfind(o.lower()) for k, o in options.items() if o.strip() and o.lower() in lowered}
        if hits:
            return max(hits, key=hits.__getitem__)
    return None


_CUE_WORDS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def parse_open(response: str) -> list[str]:
    """Candidate answers of an open response: per sentence, the text after its last cue word (the last
    sentence keeps its whole text when it has no cue), plus every number in those texts."""
    sentences = [s.strip() for s in re.split(r"\.\s(?=[A-Z])|\n", response.strip()) if s.strip()]
    kept = []
    for index, sentence in enumerate(sentences):
        lowered = sentence.lower()
        cut = max((lowered.rfind(w) + len(w) for w in _CUE_WORDS if w in lowered), default=-1)
        if cut >= 0:
            kept.append(sentence[cut:].strip().strip(".:"))
        elif index == len(sentences) - 1:
            kept.append(sentence.strip().strip("."))
    kept = [k for k in kept if k]
    return kept + [n for k in kept for n in numbers_in(k)]


def _text_forms(text: str) -> list[str]:
    """MMMU's ``normalize_str`` of a text: stripped and lowercased; a single character padded with a blank on
    either side, so that a one-letter answer is not found inside a word ("c" in "acceleration")."""
    text = text.strip().lower()
    return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def open_correct(gold: str, candidates: list[str]) -> bool:
    """MMMU's official open-question rule: a numeric gold answer equals a candidate's number when both are
    rounded to 2 decimals; any other gold answer is a substring of a candidate, both normalised by
    :func:`_text_forms`."""
    golds = parse_options(gold) if gold.strip().startswith("[") else [gold]
    for answer in golds:
        gold_number = to_number(answer)
        for candidate in candidates:
            if gold_number is not None:
                value = to_number(candidate)
                if value is not None and math.isfinite(value) and round(value, 2) == round(gold_number, 2):
                    return True
            elif any(form in text for form in _text_forms(answer) for text in _text_forms(candidate)):
                return True
    return False


def choice_judge_prompt(prompt_text: str, answer: str, options: dict[str, str], instruction: str) -> str:
    """The multiple-choice judge prompt of an :func:`mcq_prompt` sample: its question without the leading images,
    ``Question: ``, the options and ``instruction``; ``<image>`` marks inside stay, as VLMEvalKit's judge sees
    ``<image 1>``."""
    question = re.sub(r"^(?:<image>)+", "", prompt_text).split("\nOptions:\n", 1)[0].replace(instruction, "")
    question = question.strip()
    return multiple_choice_prompt(question[len("Question: "):] if question.startswith("Question: ") else question,
                                  options, answer)


def judge_choice(answer: str, target: dict) -> Judgement:
    """:func:`parse_choice` on the response's last ``\\boxed{}`` when it names a letter there, else on the whole
    response (a model asked for a boxed answer gives ``\\boxed{B}``, which the official patterns miss)."""
    options = dict(zip(option_letters(len(target["options"])), target["options"]))
    boxed = last_boxed(answer)
    letter = parse_choice(boxed, options) if boxed else None
    letter = letter or parse_choice(answer, options)
    return Judgement(letter, letter == target["answer"])


class MMMU(Benchmark):
    name = "mmmu"
    hub_name = "MMMU/MMMU"
    configs = MMMU_SUBJECTS
    split = "validation"
    local_dir = "mmmu"
    paper_column = "MMMU"
    breakdown_key = "subject"

    def load_rows(self, data_root, allow_hub):
        if data_root is not None and (data_root / self.local_dir).is_dir():
            from megatron_avar.eval.data import load_split

            dataset = load_split(hub_name=self.hub_name, config=None, split=self.split,
                                 local_dir=data_root / self.local_dir, allow_hub=False, benchmark=self.name)
            for row in dataset:
                yield None, row
            return
        yield from super().load_rows(data_root, allow_hub)

    def build(self, row: dict, config: str | None) -> Sample:
        options = parse_options(row["options"])
        images = {k: to_pil(row[f"image_{k}"]) for k in range(1, 8) if row.get(f"image_{k}") is not None}
        text = mcq_prompt(row["question"], options, MMMU_INSTRUCTION)
        is_open = row["question_type"] == "open" or not options
        subject = re.sub(r"^[a-z]+_|_\d+$", "", str(row["id"]))
        target = {"answer": str(row["answer"]), "options": options, "open": is_open, "subject": subject}
        return Sample(id=str(row["id"]), content=interleave(text, images), target=target)

    def judge(self, answer: str, target: dict) -> Judgement:
        if target["open"]:
            candidates = parse_open(answer)
            return Judgement(candidates[0] if candidates else None, open_correct(target["answer"], candidates))
        return judge_choice(answer, target)

    def judge_prompt(self, prompt_text: str, answer: str, target: dict) -> str | None:
        if target["open"]:  # VLMEvalKit asks whether it matches the gold answer: grading, not extraction
            return None
        options = dict(zip(option_letters(len(target["options"])), target["options"]))
        return choice_judge_prompt(prompt_text, answer, options, MMMU_INSTRUCTION)

    def aggregate(self, records):
        summary = super().aggregate(records)
        summary["num_subjects"] = len(summary["by_subject"])
        return summary
