"""The answer judge of `avar eval --judge FILE.yaml`: a chat model reads the answers the rules could not.

VLMEvalKit scores MathVista, MathVision and MathVerse with a GPT judge, and its multiple-choice and yes/no
benchmarks (MMMU, MMMU-Pro, MMStar, HallusionBench) with one when a key is set; without one our scores count
those items as extraction failures and are not comparable with published numbers. As VLMEvalKit does, the
rules go first and the judge gets only the rest:

1. rule: the harness rule and the benchmark's rules (`Benchmark.evaluate`). An answer they read is final and
   never sent to the judge; an unclosed ``<think>`` stays a format failure (the harness rule: no answer).
2. judge: for an extraction failure, the benchmark's VLMEvalKit prompt (`Benchmark.judge_prompt`,
   `megatron_avar.eval.judge_prompts`) with the text the rules read, sent once at temperature 0 (VLMEvalKit
   re-asks at higher temperatures; a deterministic reply keeps reruns and the cache exact).
3. grade: the reply goes through the same rules as a response (`Benchmark.evaluate`), so "B", "12" or "Yes"
   count like a rule-read answer, and "null", "Z" or "Unknown" stay failures ("judge also failed").

One difference is kept on purpose: VLMEvalKit sends *every* MathVerse answer to the judge (its rule only skips
the grading call); here, as for the other benchmarks, only the rule failures go, so a judge never overrides
an answer the rules read.

Every benchmark reports both scores: ``rule`` (the judge ignored) and ``rule+judge``. Items not judged:
MMMU's open questions (VLMEvalKit turns them into a two-option question holding the gold answer: grading,
not extraction; our rule fails on them only for an empty answer).

Requests go through the synthesis client (`megatron_avar.synth.client.ChatClient`): retries with backoff,
a timeout, a concurrency limit, the API key only from the environment variable the config names and never
sent to another origin, and an on-disk cache (``cache_dir``, default ``<out>/judge_cache``) written as each
answer arrives, so a rerun or a run killed while judging asks nothing twice; its keys hold the endpoint's URL
with the model and sampling settings, so it never answers for another judge. Each judged record of the
predictions files gets a ``judge`` field: ``{"model", "reply", "extracted", "correct"}``, or
``{"model", "error"}`` when the request failed for good.

A failed request leaves the item an extraction failure (wrong) and is counted per benchmark. When more than
``client.max_failed_share`` of a benchmark's judged items failed, or all of them, the report is still written
and the run ends with :class:`JudgeFailuresError` (`avar eval` exits 1), as `avar synth` does for a teacher
stage; rerunning asks only the failed items again.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from megatron_avar.eval.judge_prompts import PROMPT_VERSION
from megatron_avar.grading import EVAL_HARNESS, extract_answer
from megatron_avar.synth.client import ChatClient, ChatResult, RequestCache, TeacherRequestError, chat_url
from megatron_avar.synth.config import ClientConfig, TeacherConfig

__all__ = ["JudgeEndpoint", "JudgeConfig", "JudgeFailuresError", "AnswerJudge", "load_judge_config", "same_judge"]

STAGE = "judge"  # the client's stage: the cache's subfolder and part of every cache key
_NO_ANSWER = ("", "null")  # replies that mean "no answer" (MathVerse's examples answer "null")
# the parts of `AnswerJudge.describe` that decide the replies (max_failed_share decides only whether the run fails)
_IDENTITY = ("model", "url", "prompt_version", "temperature", "top_p", "max_tokens", "seed", "extra_body")


@dataclasses.dataclass(frozen=True)
class JudgeEndpoint(TeacherConfig):
    """The judge model's endpoint: `synth.config.TeacherConfig` (base_url, api_key_env, top_p, seed,
    extra_body documented there) with VLMEvalKit's judge as the defaults, so that a YAML ``endpoint:`` section
    naming only a URL and a model still gets temperature 0."""

    model: str = "gpt-4o-mini"
    """VLMEvalKit's judge (its multiple-choice benchmarks used gpt-3.5-turbo-0125 until 2026)."""
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.0
    """0: one deterministic reply per prompt, so the cache and reruns agree."""
    max_tokens: int = 128
    """VLMEvalKit's MathVista judge setting; replies are a letter, a number or a short expression."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """The answer judge (an OpenAI-compatible chat endpoint). Keys come only from the environment variable
    named by ``endpoint.api_key_env``; the file holds no secret (an ``api_key`` key is an unknown-key error)."""

    endpoint: JudgeEndpoint = dataclasses.field(default_factory=JudgeEndpoint)
    """Where the judge is and how it samples (:class:`JudgeEndpoint`)."""
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    """concurrency, timeout_s, max_retries, backoff_initial_s, backoff_max_s, max_failed_share
    (`synth.config.ClientConfig`; format_retries is not used: a reply is graded, never re-asked).
    max_failed_share is per benchmark: a larger share of its judged items whose request failed fails the run."""
    cache_dir: Path | None = None
    """Request cache; None: ``<out>/judge_cache``. Shared between runs, it answers repeated prompts for free."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", None if self.cache_dir is None else Path(self.cache_dir))
        self.endpoint.validate("endpoint")


def load_judge_config(path: str | Path) -> JudgeConfig:
    """The judge config in the YAML file at ``path`` (a minimal diff over :class:`JudgeConfig`'s defaults)."""
    from megatron_avar.config import load_config

    return load_config(JudgeConfig, path)


def same_judge(described: dict, other: dict) -> bool:
    """Whether two judge descriptions (`AnswerJudge.describe`, as scores.json records them) are of one judge: the
    same model at the same URL with the same prompts and sampling settings, so the same replies. A description
    without one of them (written by an earlier version) is another judge's: its judged scores are not kept."""
    return all(described.get(key) == other.get(key) for key in _IDENTITY)


class JudgeFailuresError(RuntimeError):
    """Too many judge requests failed for the judged scores to stand (module docstring); `avar eval` exits 1."""


class AnswerJudge:
    """Judges the extraction failures of one run's benchmarks; counts per benchmark in ``counts``."""

    def __init__(self, config: JudgeConfig, out: Path):
        self.config = config
        self.cache_dir = config.cache_dir if config.cache_dir is not None else Path(out) / "judge_cache"
        self.client = ChatClient(STAGE, config.endpoint, config.client, RequestCache(self.cache_dir), PROMPT_VERSION,
                                 config_key="endpoint", url_in_cache_key=True)
        self.counts: dict[str, dict] = {}

    def describe(self) -> dict:
        """What scores.json records about the judge (no secret: the key's variable name at most)."""
        endpoint = self.config.endpoint
        return {"model": endpoint.model, "url": chat_url(endpoint), "prompt_version": PROMPT_VERSION,
                "temperature": endpoint.temperature, "top_p": endpoint.top_p, "max_tokens": endpoint.max_tokens,
                "seed": endpoint.seed, "extra_body": endpoint.extra_body,
                "max_failed_share": self.config.client.max_failed_share}

    def _ask(self, prompt: str) -> ChatResult | TeacherRequestError:
        try:
            return self.client.chat([{"role": "user", "content": prompt}])
        except TeacherRequestError as error:  # retries exhausted: counted, the item stays a failure
            return error

    def judge_benchmark(self, benchmark, records: list[dict], ruled: list[dict]) -> tuple[list[dict], set[int]]:
        """(rule+judge results, indices of the records whose ``judge`` field changed) for one benchmark.

        records: the predictions (id, prompt, response, target, ...), updated in place: a judged record gets
        its ``judge`` field, any other loses a stale one. ruled: `Benchmark.evaluate` of each record (with its
        target). The results have ruled's keys; judged items carry the graded reply."""
        pending = {}  # record index -> judge prompt
        for index, (record, rule) in enumerate(zip(records, ruled)):
            if rule["extracted"] is None and rule["answer_source"] != "unclosed_think":
                text = extract_answer(record["response"], EVAL_HARNESS).text
                prompt = benchmark.judge_prompt(record["prompt"], text, record["target"])
                if prompt is not None:
                    pending[index] = prompt
        replies = dict(zip(pending, self.client.map(self._ask, list(pending.values()))))
        counts = {"judged": len(pending), "extracted": 0, "correct": 0, "no_answer": 0, "errors": 0,
                  "error_reasons": {}}
        results, changed = [], set()
        for index, (record, rule) in enumerate(zip(records, ruled)):
            field, result = self._outcome(benchmark, record["target"], rule, replies.get(index), counts)
            results.append(result)
            if record.get("judge") != field:
                if field is None:
                    record.pop("judge")
                else:
                    record["judge"] = field
                changed.add(index)
        self.counts[benchmark.name] = counts  # what scores.json keeps: the same on every rerun
        cached = sum(isinstance(reply, ChatResult) and reply.cached for reply in replies.values())
        print(f"{benchmark.name}: {len(pending)} answers for the judge, {cached} from its cache, "
              f"{len(pending) - cached - counts['errors']} new, {counts['errors']} failed", file=sys.stderr)
        return results, changed

    def _outcome(self, benchmark, target: dict, rule: dict, reply, counts: dict) -> tuple[dict | None, dict]:
        """(the record's ``judge`` field, its rule+judge result) for one item; ``counts`` updated."""
        model = self.config.endpoint.model
        if reply is None:  # not judged
            return None, rule
        if isinstance(reply, TeacherRequestError):
            counts["errors"] += 1
            counts["error_reasons"][reply.reason] = counts["error_reasons"].get(reply.reason, 0) + 1
            return {"model": model, "error": str(reply)}, rule
        graded = {"extracted": None, "correct": False}
        if reply.content.strip().strip("'\"").lower() not in _NO_ANSWER:
            graded = benchmark.evaluate(reply.content, target)  # the same rules; a thinking judge's tags too
        extracted, correct = graded["extracted"], bool(graded["correct"])
        counts["extracted" if extracted is not None else "no_answer"] += 1
        counts["correct"] += correct
        field = {"model": model, "reply": reply.content, "extracted": extracted, "correct": correct}
        return field, {**rule, "extracted": extracted, "correct": correct}

    def check_failures(self) -> None:
        """Raise :class:`JudgeFailuresError` naming every benchmark whose judge requests failed too often."""
        limit = self.config.client.max_failed_share
        problems = []
        for name, counts in self.counts.items():
            failed, total = counts["errors"], counts["judged"]
            if not failed or (failed < total and failed <= limit * total):
                continue
            reason, count = max(counts["error_reasons"].items(), key=lambda item: item[1])
            why = "every request failed" if failed == total else f"more than client.max_failed_share={limit}"
            problems.append(f"{name}: {failed} of {total} judge requests failed ({failed / total:.0%}; {why}); most "
                            f"common error ({count} of {failed}): {reason}")
        if problems:
            raise JudgeFailuresError(
                f"judge {self.config.endpoint.model!r} at {chat_url(self.config.endpoint)}: " + "; ".join(problems)
                + ". Those items count as extraction failures in the rule+judge scores written to scores.json and "
                "results.md, which therefore do not stand. Once the endpoint answers, rerun the same command (or "
                "--score-only with the same --judge): it asks only the failed items again, every other reply comes "
                f"from the cache ({self.cache_dir}). To accept the loss instead, raise client.max_failed_share.")
