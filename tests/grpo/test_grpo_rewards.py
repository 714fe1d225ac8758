"""Reward parts on tricky responses: the format rule's pass / fail cases, <answer> vs \\boxed{} extraction,
math-verify equivalence, the correctness gate on the visual term, and the clip / normalise options.

Expected totals are written out from the formula r = r_acc + λ_v·v·1[r_acc > 0] + λ_f·r_format."""

import pytest

from megatron_avar.grading import RL_REWARD, extract_answer
from megatron_avar.grpo.rewards import RewardConfig, format_reward, score_rollout

FORMAT_CASES = [
    ("<think>reasoning</think><answer>3</answer>", 1.0),
    ("<think>\nstep 1\nstep 2\n</think>\n\n<answer>\n3\n</answer>\n", 1.0),      # newlines inside and between
    ("  <think>a</think> <answer>3</answer>  ", 1.0),                            # outer whitespace allowed
    ("<think>a</think>so<answer>3</answer>", 0.0),                               # text between the blocks
    ("Sure! <think>a</think><answer>3</answer>", 0.0),                           # text before
    ("<think>a</think><answer>3</answer> Done.", 0.0),                           # text after
    ("<think>a</think><answer>3</answer><|im_end|>", 0.0),                       # end-of-turn token left in
    ("<think></think><answer>3</answer>", 0.0),                                  # empty think
    ("<think>a</think><answer>  </answer>", 0.0),                                # empty answer
    ("<think>a</think><answer>1</answer><answer>3</answer>", 0.0),               # two answers
    ("<think>a<think>b</think><answer>3</answer>", 0.0),                         # nested think
    ("<think>a</think></think><answer>3</answer>", 0.0),                         # stray closing tag
    ("<answer>3</answer><think>a</think>", 0.0),                                 # wrong order
    ("<think>a</think>", 0.0),                                                   # no answer
    ("<think>unclosed <answer>3</answer>", 0.0),
    ("The answer is \\boxed{3}", 0.0),
]


@pytest.mark.parametrize("response,expected", FORMAT_CASES)
def test_format_rule(response, expected):
    assert format_reward(response) == expected


EXTRACTION_CASES = [
    ("<think>x</think><answer>\\frac{1}{2}</answer>", "\\frac{1}{2}"),
    ("<think>x</think><answer>so it is \\boxed{0.5}</answer>", "0.5"),                 # box inside the tag
    ("<think>maybe \\boxed{7}</think><answer>3</answer>", "3"),                         # the tag wins
    ("<think>a</think><answer>1</answer> wait <answer>2</answer>", "2"),               # the last tag
    ("<think>try \\boxed{7}</think> final: \\boxed{3}", "3"),                           # box after think
    ("we get \\boxed{\\frac{3}{4}} and done", "\\frac{3}{4}"),                         # no tags, nested braces
    ("<think>long reasoning ending in \\boxed{3}", None),                               # cut off: no answer
    ("the answer is 3", None),                                                         # neither rule applies
]


@pytest.mark.parametrize("response,expected", EXTRACTION_CASES)
def test_answer_extraction(response, expected):
    assert extract_answer(response, RL_REWARD).text == expected


def test_parts_and_gated_total():
    config = RewardConfig()  # λ_v = 0.3, λ_f = 0.1, gated
    right = score_rollout("<think>half of it</think><answer>\\frac{1}{2}</answer>", "0.5", 2.0, config)
    assert (right.accuracy, right.format, right.visual) == (1.0, 1.0, 2.0)
    assert right.total == pytest.approx(1 + 0.3 * 2.0 + 0.1)
    wrong = score_rollout("<think>hmm</think><answer>0.4</answer>", "0.5", 2.0, config)
    assert (wrong.accuracy, wrong.format, wrong.visual) == (0.0, 1.0, 2.0)
    assert wrong.total == pytest.approx(0.1)                              # no visual reward for a wrong answer
    # the visual term as paid: λ_v·v when correct, 0 when gated out (v itself is reported either way)
    assert (right.visual_term, wrong.visual_term) == (pytest.approx(0.3 * 2.0), 0.0)
    boxed = score_rollout("It is \\boxed{50\\%}", "50", 1.0, config)     # unformatted but right
    assert (boxed.accuracy, boxed.format) == (1.0, 0.0) and boxed.total == pytest.approx(1.3)
    cut = score_rollout("<think>so \\boxed{0.5}", "0.5", 4.0, config)
    assert cut.accuracy == 0.0 and cut.answer is None and cut.total == 0.0
    ungated = score_rollout("<think>hmm</think><answer>0.4</answer>", "0.5", 2.0,
                            RewardConfig(gate_visual_on_correct=False))
    assert ungated.total == pytest.approx(0.3 * 2.0 + 0.1) and ungated.visual_term == pytest.approx(0.3 * 2.0)
    symbolic = score_rollout("<think>x</think><answer>2\\sqrt{2}</answer>", "\\sqrt{8}", 0.0, config)
    assert symbolic.accuracy == 1.0 and symbolic.total == pytest.approx(1.1)
    word = score_rollout("<think>x</think><answer>Red</answer>", "red", 0.0, config)
    assert word.accuracy == 1.0


def test_visual_clip_and_normalise():
    response = "<think>x</think><answer>3</answer>"
    assert score_rollout(response, "3", 9.0, RewardConfig(visual_clip=4.0)).visual == 4.0
    assert score_rollout(response, "3", 3.0, RewardConfig(visual_clip=4.0)).visual == 3.0
    assert score_rollout(response, "3", 3.0, RewardConfig(visual_normalise=True)).visual == pytest.approx(0.75)
    both = score_rollout(response, "3", 9.0, RewardConfig(visual_clip=4.0, visual_normalise=True))
    assert both.visual == pytest.approx(0.8) and both.total == pytest.approx(1 + 0.3 * 0.8 + 0.1)


def test_config_and_input_validation():
    with pytest.raises(ValueError, match="reward.lambda_visual"):
        RewardConfig(lambda_visual=-0.1)
    with pytest.raises(ValueError, match="reward.visual_clip"):
        RewardConfig(visual_clip=0.0)
    with pytest.raises(ValueError, match="reward.epsilon"):
        RewardConfig(epsilon=0)
    with pytest.raises(ValueError, match="reward.visual_layers 'last_half': cannot read"):
        RewardConfig(visual_layers="last_half")
    assert RewardConfig(visual_layers="0,2-3").layer_indexes(4) == (0, 2, 3)  # the one layer-set syntax
    with pytest.raises(ValueError, match=r"reward.visual_layers \[1, 5\]: layer 5 is out of range; this model has 4"):
        RewardConfig(visual_layers=[1, 5]).layer_indexes(4)
    assert RewardConfig(visual_layers=[3, 1, 1]).layer_indexes(4) == (1, 3)
    assert RewardConfig().layer_indexes(3) == (0, 1, 2)
    with pytest.raises(ValueError, match="r_visual must be a finite number >= 0"):
        score_rollout("<think>x</think><answer>3</answer>", "3", float("nan"))
    with pytest.raises(ValueError, match="ground_truth"):
        score_rollout("<think>x</think><answer>3</answer>", " ", 0.0)
