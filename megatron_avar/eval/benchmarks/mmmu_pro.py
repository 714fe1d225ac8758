"""MMMU-Pro (`MMMU/MMMU_Pro`, split ``test``, 1730 items per config; docs/evaluation.md, 'MMMU-Pro').

Two settings, each a hub config with its own local folder ``DATA_ROOT/mmmu_pro/<config>/``:
- ``standard (10 options)``: the MMMU schema (id, question with ``<image k>``, options as a list literal of
  up to 10, image_1 .. image_7, answer letter, subject). Prompt: as MMMU's (interleaved images), ending
  ``Answer directly with the option letter from the given choices. `` instead of MMMU's instruction.
- ``vision``: id, image (a screenshot of question and options), options, answer, subject. Prompt: the
  image, then ``Answer the following multiple-choice question in the image. `` plus that same sentence.
Scoring: as for MMMU multiple choice (:func:`parse_choice`; letters A-J; no letter = extraction failure).
Headline score = mean(standard-10 accuracy, vision accuracy), each reported too. ``--limit N`` takes the
first N items of *each* setting, so a limited run still covers both.
"""

from __future__ import annotations

from megatron_avar.eval.answers import option_letters
from megatron_avar.eval.benchmarks.base import Benchmark, Judgement, Sample, accuracy
from megatron_avar.eval.benchmarks.mmmu import choice_judge_prompt, interleave, judge_choice, mcq_prompt, parse_options
from megatron_avar.eval.data import to_pil

__all__ = ["MMMUPro"]

STANDARD, VISION = "standard (10 options)", "vision"
DIRECT = "Answer directly with the option letter from the given choices. "
VISION_PROMPT = "Answer the following multiple-choice question in the image. " + DIRECT


class MMMUPro(Benchmark):
    name = "mmmu_pro"
    hub_name = "MMMU/MMMU_Pro"
    configs = (STANDARD, VISION)
    split = "test"
    local_dir = "mmmu_pro"
    paper_column = "MMMU-Pro"
    breakdown_key = "setting"

    def samples(self, data_root, *, allow_hub=False, limit=None):
        counts, rows_read = dict.fromkeys(self.configs, 0), dict.fromkeys(self.configs, -1)
        for config, row in self.load_rows(data_root, allow_hub):
            rows_read[config] += 1
            if limit is None or counts[config] < limit:
                counts[config] += 1
                sample = self.sample(row, config, rows_read[config])
                assert sample is not None  # (every row is evaluated: keep is the base's)
                yield sample

    def limit_group(self, sample: Sample) -> str:
        return sample.target["setting"]  # --limit counts each setting

    def build(self, row: dict, config: str | None) -> Sample:
        options = parse_options(row["options"])
        target = {"answer": str(row["answer"]).strip(), "options": options, "setting": config,
                  "subject": row.get("subject")}
        if config == VISION:
            content = [{"type": "image", "image": to_pil(row["image"])}, {"type": "text", "text": VISION_PROMPT}]
        else:
            images = {k: to_pil(row[f"image_{k}"]) for k in range(1, 8) if row.get(f"image_{k}") is not None}
            content = interleave(mcq_prompt(row["question"], options, DIRECT), images)
        return Sample(id=f"{config}/{row['id']}", content=content, target=target)

    def judge(self, answer: str, target: dict) -> Judgement:
        return judge_choice(answer, target)

    def judge_prompt(self, prompt_text: str, answer: str, target: dict) -> str:
        options = dict(zip(option_letters(len(target["options"])), target["options"]))
        return choice_judge_prompt(prompt_text, answer, options, DIRECT)

    def aggregate(self, records):
        summary = super().aggregate(records)
        by_setting = {s: [r for r in records if r["target"]["setting"] == s] for s in self.configs}
        present = [round(accuracy(rs), 2) for rs in by_setting.values() if rs]
        summary["score"] = round(sum(present) / len(present), 2) if present else 0.0
        summary["headline"] = "mean(standard-10, vision)" if len(present) == 2 else "only one setting evaluated"
        return summary
