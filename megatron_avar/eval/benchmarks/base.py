"""The benchmark interface: read a split, build prompts, judge one answer, aggregate scores.

A benchmark turns each row of its split into a :class:`Sample` — the user turn (images and text, in the
order the model sees them) and a JSON ``target`` holding everything scoring needs — so that scoring reads
only the predictions file and never the dataset again (re-scoring is exact and cheap).

Judging one response: the `<think>/<answer>` harness rule (`grading.EVAL_HARNESS`) picks the answer
text; an unclosed ``<think>`` is a *format failure* (wrong). The benchmark's :meth:`Benchmark.judge`
extracts its answer; ``extracted=None`` is an *extraction failure* (wrong). Both rates are reported.
With ``--judge``, :meth:`Benchmark.judge_prompt` gives the prompt that sends an extraction failure to the
answer judge (`megatron_avar.eval.judge`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_avar.data.conversations import dataset_rows
from megatron_avar.eval.data import load_split
from megatron_avar.grading import EVAL_HARNESS, extract_answer

__all__ = ["Sample", "Judgement", "Benchmark", "accuracy", "group_accuracy"]


@dataclass
class Sample:
    """One benchmark item. content: the user turn as chat items ({"type": "image", "image": PIL image} /
    {"type": "text", "text": str}); target: JSON-serialisable gold answer and grouping keys."""

    id: str
    content: list[dict]
    target: dict[str, Any]

    @property
    def prompt_text(self) -> str:
        """The text of the prompt with ``<image>`` where each image goes (stored for inspection)."""
        return "".join("<image>" if item["type"] == "image" else item["text"] for item in self.content)


@dataclass(frozen=True)
class Judgement:
    extracted: str | None  # the answer the rules found (a letter, a number, "Yes"...); None: extraction failure
    correct: bool


def accuracy(records: list[dict]) -> float:
    """Percentage of records with ``correct`` true (0.0 for none)."""
    return 100.0 * sum(bool(r["correct"]) for r in records) / len(records) if records else 0.0


def _percent(count: int, total: int) -> float:
    """``count`` of ``total`` in percent, rounded to 2 decimals (0.0 for no records)."""
    return round(100.0 * count / total, 2) if total else 0.0


def group_accuracy(records: list[dict], key: str) -> dict[str, float]:
    """Accuracy per value of ``target[key]`` (sorted by value)."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record["target"].get(key)), []).append(record)
    return {name: round(accuracy(groups[name]), 2) for name in sorted(groups)}


class Benchmark:
    """Base class. Subclasses set the class attributes and implement :meth:`build` and :meth:`judge`.

    name: the CLI name. hub_name / configs / split: where the data lives on the hub (configs: None for a
    dataset without configs). local_dir: the folder under ``--data-root``. paper_column: the results-table
    column. breakdown_key: a target key whose per-value accuracy is reported (or None).
    """

    name: str = ""
    hub_name: str = ""
    configs: tuple[str | None, ...] = (None,)
    split: str = ""
    local_dir: str = ""
    paper_column: str = ""
    breakdown_key: str | None = None
    config_subdir: bool = True  # each config's files live in local_dir/<config>/ (see data.load_split)

    # -- data -----------------------------------------------------------------------------------------
    def load_rows(self, data_root: Path | None, allow_hub: bool) -> Iterator[tuple[str | None, dict]]:
        """(config, row) pairs in dataset order, config by config."""
        local = None if data_root is None else Path(data_root) / self.local_dir
        for config in self.configs:
            dataset = load_split(hub_name=self.hub_name, config=config, split=self.split, local_dir=local,
                                 allow_hub=allow_hub, benchmark=self.name, config_subdir=self.config_subdir)
            for row in dataset_rows(dataset):
                yield config, row

    def keep(self, row: dict) -> bool:
        """Whether a row belongs to the evaluated subset (all rows by default)."""
        return True

    def samples(self, data_root: Path | None, *, allow_hub: bool = False, limit: int | None = None) -> Iterator[Sample]:
        """The evaluated samples in a fixed order; ``limit``: the first ``limit`` of them."""
        count, rows_read = 0, {}
        for config, row in self.load_rows(data_root, allow_hub):
            if limit is not None and count >= limit:
                return
            rows_read[config] = rows_read.get(config, -1) + 1
            sample = self.sample(row, config, rows_read[config])
            if sample is not None:
                yield sample
                count += 1

    def limit_group(self, sample: Sample) -> str:
        """The group of samples whose first ``limit`` :meth:`samples` reads ("": the whole benchmark). A run's
        samples in each group are a prefix of the same sequence whatever its limit, which is how a resume with
        another limit is compared with the samples the predictions were made from (`eval.run_folder`)."""
        return ""

    def sample(self, row: dict, config: str | None, index: int) -> Sample | None:
        """The sample of a row (None: not in the evaluated subset); ``index``: the row's position in its config's
        split, which a row that cannot be read is named by."""
        try:
            return self.build(row, config) if self.keep(row) else None
        except KeyError as error:
            raise ValueError(f"{self.name}: a row lacks the column {error} of {self.hub_name}; a local copy "
                             "keeps the hub's columns: download it again (`hf download --repo-type "
                             f"dataset {self.hub_name} --local-dir DATA_ROOT/{self.local_dir}`)") from error
        except ValueError as error:  # an image that does not decode, a field that is not what the hub ships
            where = self.name if config is None else f"{self.name} ({config})"
            raise ValueError(f"{where}, row {index} of the data: {error}") from error

    def build(self, row: dict, config: str | None) -> Sample:
        raise NotImplementedError

    # -- scoring --------------------------------------------------------------------------------------
    def judge(self, answer: str, target: dict) -> Judgement:
        """Extract the answer from the harness answer text and compare it with the target."""
        raise NotImplementedError

    def evaluate(self, response: str, target: dict) -> dict:
        """{"answer_source", "extracted", "correct"} for one raw model response."""
        harness = extract_answer(response, EVAL_HARNESS)
        if harness.format_failure or harness.text is None:  # the harness reads no text only on a format failure
            return {"answer_source": harness.source, "extracted": None, "correct": False}
        judgement = self.judge(harness.text, target)
        return {"answer_source": harness.source, "extracted": judgement.extracted, "correct": bool(judgement.correct)}

    def judge_prompt(self, prompt_text: str, answer: str, target: dict) -> str | None:
        """The answer judge's prompt (VLMEvalKit's for this benchmark, `megatron_avar.eval.judge_prompts`) for an
        answer the rules could not read, or None: no judge for this item (the default). prompt_text: the sample's
        prompt with ``<image>`` marks; answer: the harness answer text the rules read. The judge's reply is then
        graded by :meth:`evaluate` (`megatron_avar.eval.judge`)."""
        return None

    def aggregate(self, records: list[dict]) -> dict[str, Any]:
        """Scores of judged records (each: target + the keys of :meth:`evaluate`). ``score`` is the headline
        number (percent) the results table shows."""
        num = len(records)
        summary: dict[str, Any] = {
            "score": round(accuracy(records), 2),
            "accuracy": round(accuracy(records), 2),
            "num_samples": num,
            "format_failure_rate": _percent(sum(r["answer_source"] == "unclosed_think" for r in records), num),
            "extraction_failure_rate": _percent(sum(r["extracted"] is None for r in records), num),
        }
        if self.breakdown_key is not None:
            summary[f"by_{self.breakdown_key}"] = group_accuracy(records, self.breakdown_key)
        return summary
