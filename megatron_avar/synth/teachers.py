"""The logic of the teacher stages and of verify, on lists of working rows (see records.py).

Each function takes the rows of one Curator task and returns them, same order and length, with its
columns filled in or ``drop_reason`` set. Rows already dropped are passed through untouched and cost no
request. These functions are what the Curator stages (stages.py) call; they run without Ray too.

Candidates (the ``candidates`` JSON column) are dicts:
  index        0 .. reason.num_candidates-1 (the sampling seed offset)
  chain        the reasoning teacher's chain (null when it failed: see error)
  predicted    the answer extracted from the chain; correct: predicted matches the ground truth
  anchored     the chain after the anchor stage, tags removed; num_anchors: how many were inserted
  error        why this candidate has no chain / no anchored chain ("malformed", "request_failed")
  eligible     set by verify: this candidate may be kept
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from megatron_avar.grading import SYNTHESIS, extract_answer, grade, math_equal, same_words
from megatron_avar.roles import literal_special_token
from megatron_avar.synth import prompts
from megatron_avar.synth.client import ChatClient, ChatResult, TeacherRequestError
from megatron_avar.synth.config import SynthConfig
from megatron_avar.synth.verify import format_response, select_candidate, strip_anchor_tags, without_anchor_spans

DESCRIPTION_SECTIONS = ("Global scan", "Elements", "Relations", "Scene")
_CHAIN_WRAPPER = re.compile(r"<chain>\s*(.*?)\s*</chain>", re.DOTALL | re.IGNORECASE)
_THINKING = re.compile(r"^\s*<think>.*?</think>", re.DOTALL | re.IGNORECASE)
# Tags of the response format (and of the anchor prompt's wrapper): a chain holding one would nest them.
_RESERVED_TAGS = re.compile(r"</?(?:think|answer|chain)>", re.IGNORECASE)


class Malformed(Exception):
    """A teacher answered, but not in the requested form."""


_ACCOUNTING = threading.Lock()  # candidates of one row are asked from several threads (ChatClient.map)


def _account(row: dict, result: ChatResult) -> None:
    tokens = result.prompt_tokens + result.completion_tokens
    with _ACCOUNTING:  # a read-add-write: unlocked, two threads could lose one's tokens
        row["tokens_cached" if result.cached else "tokens_spent"] += tokens


def _ask(client: ChatClient, row: dict, messages: list[dict], parse, *, candidate: int = 0, format_retries: int):
    """Ask until ``parse`` accepts the answer (at most 1 + format_retries answers, each with its own seed).
    Returns parse's value; raises Malformed or TeacherRequestError. Counts the question in ``client.stats`` as
    usable or malformed (with the last reply), what the end-of-run check weighs (pipeline.check_teacher_failures)."""
    for attempt in range(format_retries + 1):
        result = client.chat(messages, candidate=candidate, attempt=attempt)
        _account(row, result)
        try:
            value = parse(result.content)
        except Malformed as error:
            if attempt == format_retries:
                client.stats.malformed_answer(str(error), result.content)
                raise
            continue
        client.stats.add(usable=1)
        return value
    raise AssertionError("unreachable")


def without_thinking(text: str) -> str:
    """A reply without the leading ``<think>…</think>`` block a reasoning model writes when its server runs no
    reasoning parser (Qwen3 by default); Malformed when the block never closes (the reply ran out of tokens
    while thinking)."""
    match = _THINKING.match(text)
    if match is not None:
        return text[match.end():]
    if re.match(r"^\s*<think>", text, re.IGNORECASE):
        raise Malformed("the reply ends inside its <think> block (raise the teacher's max_tokens)")
    return text


def _check_no_reserved_tags(chain: str) -> None:
    found = _RESERVED_TAGS.search(chain)
    if found is not None:
        raise Malformed(f"the chain holds the tag {found.group(0)} (the response wraps chains in <think>)")
    token = literal_special_token(chain)
    if token is not None:  # the dataset would refuse the record (the tokenizer reads it as that special token)
        raise Malformed(f"the chain holds the special token {token}")


def parse_description(text: str) -> str:
    """The description when it has the four sections (as Markdown headings, in order, none empty)."""
    text = without_thinking(text)
    positions = []
    for section in DESCRIPTION_SECTIONS:
        match = re.search(rf"^\s*#+\s*{re.escape(section)}\s*:?\s*$", text, re.IGNORECASE | re.MULTILINE)
        if match is None:
            raise Malformed(f"no '## {section}' section")
        positions.append((match.start(), match.end()))
    if [p[0] for p in positions] != sorted(p[0] for p in positions):
        raise Malformed("sections out of order")
    bounds = [p[1] for p in positions], [p[0] for p in positions[1:]] + [len(text)]
    if any(not text[start:end].strip() for start, end in zip(*bounds)):
        raise Malformed("an empty section")
    return text.strip()


def parse_chain(text: str) -> tuple[str, str]:
    """(chain, predicted answer) when the chain ends in a final answer (a leading thinking block removed; a
    chain holding the response format's tags is malformed)."""
    text = without_thinking(text)
    _check_no_reserved_tags(text)
    predicted = extract_answer(text, SYNTHESIS).text
    if predicted is None:
        raise Malformed("no 'Final answer:' line")
    return text.strip(), predicted


def make_anchor_parser(min_anchors: int, chain: str):
    """A parser accepting a rewrite of ``chain`` with >= min_anchors balanced <anchor> spans and its final-answer
    line, alone or in one <chain>…</chain> block (words around it dropped), whose text outside the anchor spans has
    the words of ``chain`` (case and punctuation aside: `grading.same_words`): the teacher may only insert tagged
    sentences, so a rewrite that drops or changes reasoning, or adds words of its own ("Sure! Here is the rewritten
    chain:"), is malformed. Returns (chain without tags, number of anchors). Whether the answer survived is
    verify's check."""

    def parse_anchored(text: str) -> tuple[str, int]:
        text = without_thinking(text)
        wrapped = _CHAIN_WRAPPER.findall(text)
        if len(wrapped) > 1:
            raise Malformed(f"{len(wrapped)} <chain> blocks, one expected")
        text = wrapped[0] if wrapped else text  # words around the one <chain> block are not the chain
        _check_no_reserved_tags(text)
        stripped, num_anchors = strip_anchor_tags(text)
        if num_anchors < 0:
            raise Malformed("unbalanced <anchor> tags")
        if num_anchors < min_anchors:
            raise Malformed(f"{num_anchors} anchors, fewer than anchor.min_anchors={min_anchors}")
        if extract_answer(stripped, SYNTHESIS).text is None:
            raise Malformed("the 'Final answer:' line was lost")
        if not same_words(without_anchor_spans(text), chain):
            raise Malformed("outside its <anchor> spans the rewrite is not the original chain (reasoning dropped or "
                            "changed, or words added)")
        return stripped.strip(), num_anchors
    return parse_anchored


def describe_rows(rows: list[dict], client: ChatClient, config: SynthConfig) -> list[dict]:
    version, retries = config.run.prompt_version, config.client.format_retries

    def describe(row: dict) -> None:
        if row["drop_reason"] is not None:
            return
        messages = prompts.describe_messages(version, row["question"], Path(row["image_path"]).read_bytes(),
                                             row["image_mime"])
        try:
            row["description"] = _ask(client, row, messages, parse_description, format_retries=retries)
        except Malformed:
            row["drop_reason"] = "describe.malformed"
        except TeacherRequestError:
            row["drop_reason"] = "describe.request_failed"

    client.map(describe, rows)
    return rows


def reason_rows(rows: list[dict], client: ChatClient, config: SynthConfig) -> list[dict]:
    version, retries = config.run.prompt_version, config.client.format_retries
    jobs = [(row, index) for row in rows if row["drop_reason"] is None for index in range(config.reason.num_candidates)]
    results: dict[tuple[int, int], dict] = {}

    def reason(job: tuple[dict, int]) -> None:
        row, index = job
        candidate: dict[str, Any] = {"index": index}
        messages = prompts.reason_messages(version, row["question"], row["description"])
        try:
            candidate["chain"], candidate["predicted"] = _ask(client, row, messages, parse_chain, candidate=index,
                                                              format_retries=retries)
            candidate["correct"] = math_equal(row["answer"], candidate["predicted"])
        except Malformed:
            candidate["error"] = "malformed"
        except TeacherRequestError:
            candidate["error"] = "request_failed"
        results[(id(row), index)] = candidate

    client.map(reason, jobs)
    for row in rows:
        if row["drop_reason"] is not None:
            continue
        candidates = [results[(id(row), index)] for index in range(config.reason.num_candidates)]
        row["candidates"] = json.dumps(candidates)
        errors = [c.get("error") for c in candidates]
        if all(errors):
            all_failed = all(e == "request_failed" for e in errors)
            row["drop_reason"] = "reason.request_failed" if all_failed else "reason.malformed"
    return rows


def anchor_rows(rows: list[dict], client: ChatClient, config: SynthConfig) -> list[dict]:
    version, retries, anchor = config.run.prompt_version, config.client.format_retries, config.anchor
    live = [row for row in rows if row["drop_reason"] is None]
    candidates_of = {id(row): json.loads(row["candidates"]) for row in live}
    jobs = [(row, candidate) for row in live for candidate in candidates_of[id(row)]
            if candidate.get("chain") and (candidate.get("correct") or not anchor.only_correct)]

    def anchor_one(job: tuple[dict, dict]) -> None:
        row, candidate = job
        messages = prompts.anchor_messages(version, row["question"], row["description"], candidate["chain"],
                                           anchor.min_anchors)
        parse = make_anchor_parser(anchor.min_anchors, candidate["chain"])
        try:
            candidate["anchored"], candidate["num_anchors"] = _ask(client, row, messages, parse,
                                                                   candidate=candidate["index"], format_retries=retries)
        except Malformed:
            candidate["error"] = "anchor_malformed"
        except TeacherRequestError:
            candidate["error"] = "anchor_request_failed"

    client.map(anchor_one, jobs)
    for row in live:
        tried = [c for c in candidates_of[id(row)] if c.get("chain") and (c.get("correct") or not anchor.only_correct)]
        row["candidates"] = json.dumps(candidates_of[id(row)])
        if tried and not any(c.get("anchored") for c in tried):
            failed = {c.get("error") for c in tried}
            row["drop_reason"] = "anchor.request_failed" if failed == {"anchor_request_failed"} else "anchor.malformed"
    return rows


def verify_rows(rows: list[dict], config: SynthConfig) -> list[dict]:
    """Re-extract and grade each candidate's final chain, keep the best, format the response."""
    for row in rows:
        if row["drop_reason"] is not None:
            continue
        candidates = json.loads(row["candidates"])
        for candidate in candidates:
            final = candidate.get("anchored") if config.anchor.enabled else candidate.get("chain")
            graded = grade(final, row["answer"], SYNTHESIS) if final else None
            candidate["final_answer"] = graded.answer if graded else None
            candidate["final_correct"] = graded is not None and graded.correct
            candidate["eligible"] = final is not None and candidate["final_answer"] is not None and (
                candidate["final_correct"] or not config.verify.keep_only_correct)
        chosen = select_candidate(candidates, config.verify.select)
        row["candidates"] = json.dumps(candidates)
        if chosen is None:
            had_answer = any(c.get("predicted") for c in candidates)
            changed = any(c.get("correct") and c.get("anchored") for c in candidates)
            wrong = "verify.answer_changed" if changed else "verify.wrong_answer"
            row["drop_reason"] = wrong if had_answer else "verify.no_answer"
            continue
        final = chosen.get("anchored") if config.anchor.enabled else chosen["chain"]
        assert final is not None  # select_candidate picks eligible candidates, which have their final text
        row["response"] = format_response(final, chosen["final_answer"])
        metadata = json.loads(row["metadata"]) if row["metadata"] else {}
        metadata["synth"] = {"candidate": chosen["index"], "num_candidates": len(candidates),
                             "num_anchors": chosen.get("num_anchors"), "correct": chosen["final_correct"]}
        row["metadata"] = json.dumps(metadata, sort_keys=True)
    return rows
