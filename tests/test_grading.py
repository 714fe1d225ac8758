"""The four answer policies on ONE set of responses: what each reads, what it refuses, what it grades right
(docs/grading.md). The ground truth is "7" throughout; every response names 7 as its final answer in some
form (or names none), so each False below is a documented refusal, not a wrong answer."""

from pathlib import Path

import pytest

from megatron_avar.eval.answers import free_form_candidate
from megatron_avar.grading import (
    EVAL_HARNESS,
    INTERVENTION,
    POLICIES,
    RL_REWARD,
    SYNTHESIS,
    AnswerPolicy,
    extract_answer,
    grade,
    math_equal,
    same_words,
)

REPO = Path(__file__).resolve().parents[1]
TRUTH = "7"

RESPONSES = {
    "after_think_sentence": "<think>3 + 4</think> so the answer is 7",
    "boxed": "<think>3 + 4</think> so \\boxed{7}",
    "tagged": "<think>3 + 4</think><answer>7</answer>",
    "final_answer_line": "Adding 3 and 4.\nFinal answer: 7",
    "no_answer": "I cannot read the figure.",
    "two_tags": "<think>first 6</think><answer>6</answer> wait, <answer>7</answer>",
    "two_boxes": "\\boxed{6}, no: \\boxed{7}",
    "two_final_lines": "Final answer: 6\nrecheck\nFinal answer: 7",
    "tag_then_box": "<think>3 + 3</think><answer>6</answer> oh, \\boxed{7}",
    "cut_off": "<think>3 + 4 is \\boxed{7}, so",
    "box_in_tag": "<think>x</think><answer>so \\boxed{7}</answer>",
    "tag_in_cut_off": "<think>3 + 4 <answer>7</answer>? wait, let me re-check the",
}

NONE = (None, "none")
# response -> (RL_REWARD, EVAL_HARNESS, INTERVENTION, SYNTHESIS), each (extracted text, deciding step).
EXTRACTED = {
    "after_think_sentence": (NONE, ("so the answer is 7", "after_think"), ("7", "last_number"), NONE),
    "boxed": (("7", "boxed_after_think"), ("so \\boxed{7}", "after_think"), ("7", "boxed"), ("7", "boxed")),
    "tagged": (("7", "answer_tag_boxed"), ("7", "answer_tag"), ("7", "answer_tag"), NONE),
    "final_answer_line": (NONE, (RESPONSES["final_answer_line"], "raw"), ("7", "last_number"),
                          ("7", "final_answer_line")),
    "no_answer": (NONE, ("I cannot read the figure.", "raw"), ("I cannot read the figure.", "raw"), NONE),
    "two_tags": (("7", "answer_tag_boxed"), ("7", "answer_tag"), ("7", "answer_tag"), NONE),
    "two_boxes": (("7", "boxed_after_think"), (RESPONSES["two_boxes"], "raw"), ("7", "boxed"), ("7", "boxed")),
    "two_final_lines": (NONE, (RESPONSES["two_final_lines"], "raw"), ("7", "last_number"),
                        ("7", "final_answer_line")),
    "tag_then_box": (("6", "answer_tag_boxed"), ("6", "answer_tag"), ("6", "answer_tag"), ("7", "boxed")),
    "cut_off": ((None, "unclosed_think"), (None, "unclosed_think"), ("7", "boxed"), ("7", "boxed")),
    "box_in_tag": (("7", "answer_tag_boxed"), ("so \\boxed{7}", "answer_tag"), ("so \\boxed{7}", "answer_tag"),
                   ("7", "boxed")),
    "tag_in_cut_off": ((None, "unclosed_think"), ("7", "answer_tag"), ("7", "answer_tag"), NONE),
}
ORDER = (RL_REWARD, EVAL_HARNESS, INTERVENTION, SYNTHESIS)

# The responses each policy grades correct against "7". EVAL_HARNESS has no comparison of its own: here a
# free-form numeric benchmark's rule (MathVerse / MathVision: cue answer, short text or last number, then
# math_equal) reads the harness text.
CORRECT = {
    "rl_reward": {"boxed", "tagged", "two_tags", "two_boxes", "box_in_tag"},
    "eval_harness": set(RESPONSES) - {"no_answer", "tag_then_box", "cut_off"},
    "intervention": set(RESPONSES) - {"no_answer", "tag_then_box"},
    "synthesis": {"boxed", "final_answer_line", "two_boxes", "two_final_lines", "tag_then_box", "cut_off",
                  "box_in_tag"},
}


def _correct(response: str, policy: AnswerPolicy) -> bool:
    if policy is EVAL_HARNESS:
        text = extract_answer(response, policy).text
        return text is not None and math_equal(TRUTH, free_form_candidate(text, numeric=True))
    return grade(response, TRUTH, policy).correct


@pytest.mark.parametrize("name", list(RESPONSES))
def test_every_policy_reads_the_same_responses_as_documented(name):
    extracted = [extract_answer(RESPONSES[name], policy) for policy in ORDER]
    assert [(e.text, e.source) for e in extracted] == list(EXTRACTED[name])


@pytest.mark.parametrize("policy", ORDER, ids=lambda policy: policy.name)
def test_which_responses_each_policy_grades_correct(policy):
    assert {name for name, response in RESPONSES.items() if _correct(response, policy)} == CORRECT[policy.name]


def test_the_issue_case_strict_reward_lenient_intervention():
    # Issue 17: "…</think> so the answer is 7" — 0 for GRPO's r_acc (bare text after the reasoning is not a
    # committed answer), 7 for `avar intervene` (it takes the last number wherever it is).
    response = RESPONSES["after_think_sentence"]
    assert grade(response, TRUTH, RL_REWARD).correct is False
    assert grade(response, TRUTH, INTERVENTION).answer == "7"


def test_a_cut_off_response_is_a_format_failure_only_where_the_format_matters():
    response = RESPONSES["cut_off"]
    assert extract_answer(response, RL_REWARD).format_failure and extract_answer(response, EVAL_HARNESS).format_failure
    assert not extract_answer(response, INTERVENTION).format_failure
    assert not extract_answer(response, SYNTHESIS).format_failure


def test_synthesis_prefers_the_final_answer_line_and_counts_empty_answers_as_none():
    assert extract_answer("Final answer: 6\nthen \\boxed{7}", SYNTHESIS).text == "6"
    assert extract_answer("so \\boxed{}", SYNTHESIS).text is None
    assert extract_answer("so \\boxed{}", INTERVENTION).text == ""  # found, and graded wrong


def test_intervention_compares_words_too_the_reward_does_not():
    response = "<think>the colour of the disc</think><answer>Red!</answer>"
    assert grade(response, "red", INTERVENTION).correct
    assert not grade(response, "red", RL_REWARD).correct


@pytest.mark.parametrize("gold, predicted", [("-3", "3"), ("x > 1", "x < 1"), ("3.5", "3 5"), ("1/2", "1 2"),
                                             ("x^2", "x 2"), ("x + 1", "x 1")])
def test_the_word_rule_keeps_signs_and_decimal_points(gold, predicted):
    """Found in review: every punctuation mark was dropped, signs too, so `avar intervene` graded "3" correct for
    "-3" and "x < 1" for "x > 1", and a teacher's anchor rewrite could flip a sign in the chain it must keep."""
    assert not same_words(gold, predicted) and not grade(f"<answer>{predicted}</answer>", gold, INTERVENTION).correct
    assert same_words(gold, gold.upper() + ".") and same_words("(A) dark-red!", "a dark red")
    assert same_words("-3", "\u22123")  # the minus sign U+2212 is a hyphen-minus


def test_the_eval_harness_leaves_comparison_to_the_benchmarks():
    with pytest.raises(ValueError, match="eval_harness policy has no comparison"):
        grade("<answer>7</answer>", TRUTH, EVAL_HARNESS)


def test_policies_are_named_and_documented_here_and_in_the_docs():
    assert set(POLICIES) == {policy.name for policy in ORDER}
    table = (REPO / "docs" / "grading.md").read_text()
    for policy in ORDER:
        assert POLICIES[policy.name] is policy
        assert policy.__doc__ and policy.__doc__ != AnswerPolicy.__doc__  # its own docstring
        assert f"`{policy.name}`" in table, f"docs/grading.md does not list the {policy.name} policy"
    with pytest.raises(ValueError, match="at least one step"):
        AnswerPolicy(name="empty", doc="none", steps=(), matches=None)


def test_grading_in_a_worker_thread_is_quiet_about_its_timeout(monkeypatch, caplog):
    """math-verify's timeout (SIGALRM) is off in threads on purpose; its "Timeout is disabled" notice, once per
    process and module, came four times in an `avar synth` run (found in review). The grade is unchanged."""
    import threading

    import math_verify.grader
    import math_verify.parser

    for module in (math_verify.grader, math_verify.parser):
        monkeypatch.setattr(module, "TIMEOUT_WARNING_SHOWN", False)  # as in a fresh process
    graded = []
    worker = threading.Thread(target=lambda: graded.append(grade("<answer>\\frac{1}{2}</answer>", "0.5", RL_REWARD)))
    with caplog.at_level("WARNING"):
        worker.start()
        worker.join()
    assert graded[0].correct
    assert not [record for record in caplog.records if "Timeout is disabled" in record.getMessage()]
