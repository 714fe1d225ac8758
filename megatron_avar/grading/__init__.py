"""Answer grading: the one place that reads a final answer out of a response and compares it with the truth.

Every command that grades answers goes through here with a named policy (docs/grading.md has the table):
GRPO's reward (:data:`RL_REWARD`, strict: the format is rewarded too), `avar eval`'s harness rule
(:data:`EVAL_HARNESS`, then each benchmark's own rules in ``eval/``), `avar intervene`
(:data:`INTERVENTION`, lenient) and `avar synth`'s verification (:data:`SYNTHESIS`, "Final answer:" lines).

tags.py      the `<think>/<answer>` grammar: answer blocks, text after the reasoning, the strict format
spans.py     answers inside free text: ``\\boxed{}``, "answer is" cues, "Final answer:" lines, numbers
compare.py   numbers with units stripped, math-verify equivalence, plain text, edit distance
policies.py  the extractor, its policies and :func:`grade`

A leaf package: it imports nothing else from megatron_avar (tests/test_import_cycles.py checks it), so every
command may depend on it without depending on another command.
"""

from megatron_avar.grading.compare import (
    edit_distance,
    has_words,
    math_equal,
    math_equal_or_same_words,
    same_words,
    strip_units,
    to_number,
)
from megatron_avar.grading.policies import (
    EVAL_HARNESS,
    INTERVENTION,
    POLICIES,
    RL_REWARD,
    SYNTHESIS,
    AnswerPolicy,
    Extraction,
    Grade,
    Step,
    extract_answer,
    grade,
)
from megatron_avar.grading.spans import (
    cue_answer,
    final_answer_line,
    last_boxed,
    numbers_in,
    remove_final_answer_line,
    standalone_numbers,
    without_emphasis,
)
from megatron_avar.grading.tags import (
    ANSWER_BLOCK,
    STRICT_FORMAT,
    has_unclosed_think,
    is_strictly_formatted,
    last_answer_block,
    text_after_think,
)

__all__ = [
    "AnswerPolicy", "Step", "Extraction", "Grade", "extract_answer", "grade",
    "RL_REWARD", "EVAL_HARNESS", "INTERVENTION", "SYNTHESIS", "POLICIES",
    "ANSWER_BLOCK", "STRICT_FORMAT", "last_answer_block", "text_after_think", "has_unclosed_think",
    "is_strictly_formatted",
    "last_boxed", "cue_answer", "final_answer_line", "remove_final_answer_line", "numbers_in", "standalone_numbers",
    "without_emphasis",
    "strip_units", "has_words", "to_number", "math_equal", "same_words", "math_equal_or_same_words", "edit_distance",
]
