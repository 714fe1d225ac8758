"""The one answer extractor and its named policies: which answer a command reads out of a response.

A policy is an ordered list of :class:`Step` rules; :func:`extract_answer` tries them in order and the first
that applies decides (an answer, or a refusal). The four policies differ on purpose — docs/grading.md has
the table of which command uses which and why:

=================  =====================================================================================
policy             steps, in order
=================  =====================================================================================
RL_REWARD          answer_tag_boxed, unclosed_think (refuse), boxed_after_think
EVAL_HARNESS       answer_tag, after_think, unclosed_think (refuse), raw
INTERVENTION       answer_tag, boxed, last_number, raw
SYNTHESIS          final_answer_line, boxed (an empty answer is none)
=================  =====================================================================================

:func:`grade` extracts with a policy and compares with the policy's rule (compare.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from megatron_avar.grading.compare import math_equal, math_equal_or_same_words
from megatron_avar.grading.spans import final_answer_line, last_boxed, numbers_in
from megatron_avar.grading.tags import has_unclosed_think, last_answer_block, text_after_think

__all__ = ["Step", "AnswerPolicy", "Extraction", "Grade", "extract_answer", "grade", "RL_REWARD", "EVAL_HARNESS",
           "INTERVENTION", "SYNTHESIS", "POLICIES", "UNCLOSED_THINK", "NO_RULE_APPLIED"]


@dataclass(frozen=True)
class Step:
    """One rule of a policy. ``read`` returns the answer text the rule finds in a whole response (stripped,
    possibly empty) or None when the rule does not apply. A ``refuses`` rule that applies ends the search
    with no answer: the response breaks a format the policy insists on."""

    source: str  # recorded with what the rule decides (predictions files keep it: names are stable)
    read: Callable[[str], str | None]
    refuses: bool = False


def _boxed_in_answer_block(response: str) -> str | None:
    block = last_answer_block(response)
    if block is None:
        return None
    boxed = last_boxed(block)
    return boxed if boxed is not None else block


def _boxed_after_think(response: str) -> str | None:
    after = text_after_think(response)
    return last_boxed(response if after is None else after)


def _last_number(response: str) -> str | None:
    numbers = numbers_in(response)
    return numbers[-1] if numbers else None


ANSWER_TAG = Step("answer_tag", last_answer_block)
"""The inner text of the last ``<answer>…</answer>`` block."""
ANSWER_TAG_BOXED = Step("answer_tag_boxed", _boxed_in_answer_block)
"""The last ``<answer>`` block, narrowed to its last ``\\boxed{}`` when it holds one."""
AFTER_THINK = Step("after_think", text_after_think)
"""The text after the last ``</think>``."""
UNCLOSED_THINK = Step("unclosed_think", lambda response: "" if has_unclosed_think(response) else None, refuses=True)
"""Refuses a response whose ``<think>`` is never closed (cut off at the generation budget while reasoning)."""
RAW = Step("raw", str.strip)
"""The whole response, stripped: always applies."""
BOXED = Step("boxed", last_boxed)
"""The last ``\\boxed{}`` anywhere, inside reasoning too."""
BOXED_AFTER_THINK = Step("boxed_after_think", _boxed_after_think)
"""The last ``\\boxed{}`` after the last ``</think>`` (anywhere when the response has no ``</think>``)."""
LAST_NUMBER = Step("last_number", _last_number)
"""The last number anywhere (thousands separators removed)."""
FINAL_ANSWER_LINE = Step("final_answer_line", final_answer_line)
"""The last "Final answer: …" line (its ``\\boxed{}`` content when it holds one)."""

NO_RULE_APPLIED = "none"
"""The source of an :class:`Extraction` when no step of the policy applied."""


@dataclass(frozen=True)
class AnswerPolicy:
    """A named extraction policy: ``steps`` tried in order (the first that applies decides), whether an
    empty answer counts as none, and ``matches(truth, answer)``, the comparison :func:`grade` uses (None: the
    caller compares, as each benchmark of `avar eval` does). ``doc`` says what it accepts and why; it is
    also the object's ``__doc__``."""

    name: str
    doc: str
    steps: tuple[Step, ...]
    matches: Callable[[str, str | None], bool] | None
    empty_is_none: bool = False

    def __post_init__(self):
        if not self.steps:
            raise ValueError(f"policy {self.name!r} needs at least one step")
        object.__setattr__(self, "__doc__", inspect.cleandoc(self.doc))  # policy.__doc__ documents the policy


@dataclass(frozen=True)
class Extraction:
    """What a policy read from one response. ``text``: the answer (None: no answer); ``source``: the
    :class:`Step` that decided ("answer_tag", "unclosed_think", …) or ``"none"`` when none applied."""

    text: str | None
    source: str

    @property
    def format_failure(self) -> bool:
        """The response was refused for its format (a ``<think>`` never closed), not merely answerless."""
        return self.source == UNCLOSED_THINK.source


@dataclass(frozen=True)
class Grade:
    """One graded response: ``correct`` by the policy's comparison, and the extraction it compared."""

    correct: bool
    answer: str | None
    source: str


def extract_answer(response: str, policy: AnswerPolicy) -> Extraction:
    """The answer ``policy`` reads out of ``response`` (the one extractor of the project)."""
    for step in policy.steps:
        found = step.read(response)
        if found is None:
            continue
        if step.refuses or (policy.empty_is_none and not found):
            return Extraction(None, step.source)
        return Extraction(found, step.source)
    return Extraction(None, NO_RULE_APPLIED)


def grade(response: str, truth: str, policy: AnswerPolicy) -> Grade:
    """Extract with ``policy`` and compare with ``truth`` by ``policy.matches`` (no answer is wrong)."""
    if policy.matches is None:
        raise ValueError(f"the {policy.name} policy has no comparison of its own (each benchmark of avar eval "
                         "judges the extracted text by its rules); call extract_answer and compare yourself")
    extraction = extract_answer(response, policy)
    correct = extraction.text is not None and policy.matches(truth, extraction.text)
    return Grade(correct=correct, answer=extraction.text, source=extraction.source)


RL_REWARD = AnswerPolicy(
    name="rl_reward",
    doc="""GRPO's r_acc (grpo/rewards.py). Strict on purpose: the format is part of what is rewarded.

    Refuses a response whose ``<think>`` is never closed, even when its reasoning holds a box or an
    ``<answer>`` block (cut off at the budget); else accepts the last ``<answer>`` block (narrowed to its last
    ``\\boxed{}`` when it holds one); without a block, the last ``\\boxed{}`` after the last ``</think>``
    (anywhere when there is no think block). It never reads bare text: "…</think> so the answer is 7" has
    no answer (r_acc = 0). A policy learns whatever the reader accepts, so the reader accepts only an answer
    the model committed to in the asked-for form, not a number met in its reasoning or a guess cut off at the
    budget. Compared by ``math_equal``.""",
    steps=(UNCLOSED_THINK, ANSWER_TAG_BOXED, BOXED_AFTER_THINK),
    matches=math_equal,
)

EVAL_HARNESS = AnswerPolicy(
    name="eval_harness",
    doc="""`avar eval`'s harness rule (eval/benchmarks/base.py, docs/evaluation.md, 'Shared rules').

    Gives the answer TEXT a benchmark's judge reads next, not the final answer: the last ``<answer>`` block;
    else the text after the last ``</think>``; else, when a ``<think>`` was never closed, no answer (counted
    as a format failure and scored wrong); else the whole response (models that answer without tags). The
    benchmark then applies its published rules (VLMEvalKit's can_infer, "answer is" cues, MMMU's parsers),
    so scores stay comparable with other models' reported numbers; it has no comparison of its own.""",
    steps=(ANSWER_TAG, AFTER_THINK, UNCLOSED_THINK, RAW),
    matches=None,
)

INTERVENTION = AnswerPolicy(
    name="intervention",
    doc="""`avar intervene` (analysis/run_intervene.py). The most lenient: it never refuses.

    Accepts the last ``<answer>`` block; else the last ``\\boxed{}`` anywhere (inside an unclosed
    ``<think>`` too); else the last number anywhere ("…</think> so the answer is 7" gives 7); else the whole
    text. The command measures how an attention edit changes what a model answers, base models without
    tags or boxes and short generation budgets included, so it takes the answer wherever it is. Compared
    by ``math_equal``, else the same words ignoring case and punctuation ("Red!" = "red").""",
    steps=(ANSWER_TAG, BOXED, LAST_NUMBER, RAW),
    matches=math_equal_or_same_words,
)

SYNTHESIS = AnswerPolicy(
    name="synthesis",
    doc="""`avar synth`'s verification of teacher chains (synth/teachers.py).

    Accepts the last line "Final answer: …" (its ``\\boxed{}`` content when it holds one); else the last
    ``\\boxed{}`` anywhere; an empty answer is none. Tags are not read: teachers write plain chains ending in
    that line (prompts v1), which synthesis wraps in ``<think>/<answer>`` afterwards. The answer becomes the
    SFT target, so a chain without an explicit final answer is re-asked or dropped rather than guessed
    from a stray number. Compared by ``math_equal``.""",
    steps=(FINAL_ANSWER_LINE, BOXED),
    matches=math_equal,
    empty_is_none=True,
)

POLICIES: dict[str, AnswerPolicy] = {policy.name: policy for policy in (RL_REWARD, EVAL_HARNESS, INTERVENTION,
                                                                        SYNTHESIS)}
"""Every policy by name."""
