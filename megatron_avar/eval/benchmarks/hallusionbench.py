"""HallusionBench, the 951 questions with an image (`lmms-lab/HallusionBench`, split ``image``;
docs/evaluation.md, 'HallusionBench').

Row schema: category ("VD" | "VS"), subcategory, visual_input ("1" original figure, "2" edited), set_id,
figure_id, sample_note, question_id, question, gt_answer_details, gt_answer ("1" = yes, "0" = no),
filename, image (Image).

Prompt: the image, then the question, nothing added.
Extraction: the lowercased words of the answer: "yes" without "no" is Yes, "no" without "yes" is No;
anything else is Unknown (an extraction failure, wrong; VLMEvalKit, and ``--judge``, ask a judge).
Metrics (percent): aAcc = per-question accuracy; fAcc = share of figure groups (category, subcategory,
set_id, figure_id) answered fully correctly; qAcc = share of question groups (category, subcategory,
set_id, question_id: one question over the original and the edited figure) fully correct. The category is
part of both keys because subcategory names repeat across VD and VS ("math"). The headline score is
VLMEvalKit's single number, the mean of the three; all three are reported.
"""

from __future__ import annotations

import re

from megatron_avar.eval.benchmarks.base import Benchmark, Judgement, Sample
from megatron_avar.eval.data import to_pil
from megatron_avar.eval.judge_prompts import yes_no_prompt

__all__ = ["HallusionBench", "yes_no"]


def yes_no(answer: str) -> str | None:
    words = set(re.findall(r"[a-z]+", answer.lower()))
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return None


def _fully_correct_share(records: list[dict], keys: tuple[str, ...]) -> float:
    groups: dict[tuple, bool] = {}
    for record in records:
        key = tuple(str(record["target"][k]) for k in keys)
        groups[key] = groups.get(key, True) and bool(record["correct"])
    return 100.0 * sum(groups.values()) / len(groups) if groups else 0.0


class HallusionBench(Benchmark):
    name = "hallusionbench"
    hub_name = "lmms-lab/HallusionBench"
    split = "image"
    local_dir = "hallusionbench"
    paper_column = "HallusionBench"
    breakdown_key = "subcategory"

    def keep(self, row: dict) -> bool:
        return str(row.get("visual_input", "1")) != "0" and row.get("image") is not None

    def build(self, row: dict, config: str | None) -> Sample:
        target = {"answer": "Yes" if str(row["gt_answer"]) == "1" else "No", "category": row["category"],
                  "subcategory": row["subcategory"], "set_id": row["set_id"], "figure_id": row["figure_id"],
                  "question_id": row["question_id"], "visual_input": str(row["visual_input"])}
        sample_id = "_".join(str(row[k]) for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
        content = [{"type": "image", "image": to_pil(row["image"])}, {"type": "text", "text": row["question"]}]
        return Sample(id=sample_id, content=content, target=target)

    def judge(self, answer: str, target: dict) -> Judgement:
        predicted = yes_no(answer)
        return Judgement(predicted, predicted == target["answer"])

    def judge_prompt(self, prompt_text: str, answer: str, target: dict) -> str:
        return yes_no_prompt(prompt_text.replace("<image>", "").strip(), answer)

    def aggregate(self, records):
        summary = super().aggregate(records)
        a_acc = summary["accuracy"]
        f_acc = _fully_correct_share(records, ("category", "subcategory", "set_id", "figure_id"))
        q_acc = _fully_correct_share(records, ("category", "subcategory", "set_id", "question_id"))
        summary.update(aAcc=round(a_acc, 2), fAcc=round(f_acc, 2), qAcc=round(q_acc, 2),
                       score=round((a_acc + f_acc + q_acc) / 3, 2), headline="mean(aAcc, fAcc, qAcc)")
        return summary
