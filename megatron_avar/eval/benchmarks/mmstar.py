"""MMStar (`Lin-Chen/MMStar`, split ``val``, 1500 items; docs/evaluation.md, 'MMStar').

Row schema: index, question (options inline: "…\\nOptions: A: …, B: …, C: …, D: …"), image (Image), answer
(a letter), category (6 core capabilities), l2_category (18), meta_info. The hub repository stores the
split as ``mmstar.parquet``; that name is accepted as the ``val`` split.

Prompt (VLMEvalKit's MCQ prompt, no interleaving): the image, then ``Question: {question}``, ``Options:``,
one ``A. …`` line per option and ``Please select the correct answer from the options above. ``. The
options are split out of the question at ``Options:`` (VLMEvalKit's TSV holds them as A-D columns); when
they cannot be parsed the question is kept verbatim with letters A-D.

Scoring: :func:`can_infer` (VLMEvalKit's rules; ``--judge`` adds its option-matching judge) must give the gold
letter; none = extraction failure. Report: overall accuracy and per ``category`` (the 6 capabilities).
"""

from __future__ import annotations

import re

from megatron_avar.eval.answers import can_infer
from megatron_avar.eval.benchmarks.base import Benchmark, Judgement, Sample
from megatron_avar.eval.benchmarks.mmmu import MMMU_INSTRUCTION, choice_judge_prompt, mcq_prompt
from megatron_avar.eval.data import load_split, read_data_files, to_pil

__all__ = ["MMStar", "split_inline_options"]

_INLINE = re.compile(r"\n?Options:\s*(.*)$", re.DOTALL)
_OPTION = re.compile(r"(?:^|,\s*|\n)([A-F])[:.]\s*")


def split_inline_options(question: str) -> tuple[str, dict[str, str]]:
    """("Which …?", {"A": "…", …}) from MMStar's "…\\nOptions: A: …, B: …" question; ({}) when not parseable."""
    match = _INLINE.search(question)
    if not match:
        return question, {}
    body = match.group(1).strip()
    marks = list(_OPTION.finditer(body))
    letters = [m.group(1) for m in marks]
    if not marks or marks[0].start() != 0 or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return question, {}
    options = {}
    for mark, following in zip(marks, marks[1:] + [None]):
        options[mark.group(1)] = body[mark.end(): following.start() if following else len(body)].strip()
    return question[: match.start()].strip(), options


class MMStar(Benchmark):
    name = "mmstar"
    hub_name = "Lin-Chen/MMStar"
    split = "val"
    local_dir = "mmstar"
    paper_column = "MMStar"
    breakdown_key = "category"

    def load_rows(self, data_root, allow_hub):
        folder = None if data_root is None else data_root / self.local_dir
        if folder is not None and (folder / "mmstar.parquet").is_file():
            from megatron_avar.data.conversations import dataset_rows, undecoded

            rows = read_data_files([folder / "mmstar.parquet"], benchmark=self.name, hub_name=self.hub_name,
                                   local_dir=folder)
            for row in dataset_rows(undecoded(rows)):
                yield None, row
            return
        for row in load_split(hub_name=self.hub_name, config=None, split=self.split, local_dir=folder,
                              allow_hub=allow_hub, benchmark=self.name):
            yield None, row

    def build(self, row: dict, config: str | None) -> Sample:
        question, options = split_inline_options(row["question"])
        text = mcq_prompt(question, list(options.values()), MMMU_INSTRUCTION) if options else (
            f"Question: {row['question']}\n{MMMU_INSTRUCTION}")
        target = {"answer": str(row["answer"]).strip(), "options": options or dict.fromkeys("ABCD", ""),
                  "category": row.get("category"), "l2_category": row.get("l2_category")}
        content = [{"type": "image", "image": to_pil(row["image"])}, {"type": "text", "text": text}]
        return Sample(id=str(row["index"]), content=content, target=target)

    def judge(self, answer: str, target: dict) -> Judgement:
        letter = can_infer(answer, target["options"])
        return Judgement(letter, letter == target["answer"])

    def judge_prompt(self, prompt_text: str, answer: str, target: dict) -> str:
        return choice_judge_prompt(prompt_text, answer, target["options"], MMMU_INSTRUCTION)
