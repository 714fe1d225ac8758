"""Fault injection (issue 16) on the GRPO step: a policy update that leaves non-finite weights stops the run at
that step, naming the step and its prompts as an update failure. Before the fix the step "succeeded" (and could
be checkpointed); the next step's forward then produced NaN attention masses and the run failed blaming r_visual
("check the masses reaching the visual-reward sink").

The step runs for real (grpo.trainer.grpo_step on 1 gloo rank with megatron's parallel state) around stand-ins
for the generation backend and the Megatron policy: a real actor cannot be driven to a NaN update with a config
that passes validation, and a stand-in whose update writes NaN into its weights is exactly the fault."""

import math

import pytest
import torch

from megatron_avar.testing import run_on_ranks

PROMPTS = ["triangle-007", "bar-chart-013"]


def _rollout(prompt_id: str, sample_index: int):
    from megatron_avar.grpo.interfaces import Rollout
    from megatron_avar.roles import TokenRole

    prompt = torch.tensor([151644, 8948, 151645, 151644, 872])
    response = torch.tensor([11, 12 + sample_index, 151645])
    roles = torch.cat([torch.full_like(prompt, int(TokenRole.TEMPLATE)),
                       torch.full_like(response, int(TokenRole.RESPONSE))])
    return Rollout(prompt_id=prompt_id, sample_index=sample_index, ground_truth="1",
                   input_ids=torch.cat([prompt, response]), roles=roles, prompt_length=len(prompt),
                   response_text=f"<think>x</think><answer>{sample_index}</answer>",
                   generator_logprobs=torch.full((len(response),), -1.0), finish_reason="stop")


class _Backend:
    def prepare_generation(self):
        pass

    def finish_generation(self):
        pass

    def close(self):
        pass

    def update_weights(self, weights):
        for _ in weights:
            pass

    def generate(self, prompts, n, sampling):
        return [_rollout(pid, k) for pid in prompts.prompt_ids for k in range(n)]


class _DivergingPolicy:
    """The policy's update writes NaN into the weights while reporting a finite loss and gradient norm (what a
    diverging Adam step looks like from outside); its r_visual comes from the weights, as the real one's does."""

    def __init__(self):
        self.model = torch.nn.Linear(2, 2)  # what the trainer reads of a TrainingModel: parameters()
        self.nonfinite_loss_rollouts = []  # its loss is finite

    def named_weights(self):
        yield from self.model.named_parameters()

    def log_probs_with_masses(self, rollouts):
        from megatron_avar.grpo.interfaces import PolicyLogProbs, response_token_mask

        mask = response_token_mask(rollouts)
        weight_mean = float(self.model.weight.detach().abs().mean())
        return PolicyLogProbs(logp=torch.where(mask, -1.0, 0.0),
                              r_visual=torch.full((len(rollouts),), 1.0 + weight_mean))

    def train_step(self, rollouts, old_logp, advantages, ref_logp=None):
        with torch.no_grad():
            self.model.weight.fill_(float("nan"))
        return {"loss/policy": 0.25, "loss/ratio_max": 1.0, "optim/grad_norm": 0.5, "optim/lr": 1e-6,
                "data/response_tokens": float(3 * len(rollouts))}


def _two_steps_with_a_diverging_update():
    from megatron.core import parallel_state

    from megatron_avar.config import load_config
    from megatron_avar.grpo.config import GRPOConfig
    from megatron_avar.grpo.interfaces import PromptBatch
    from megatron_avar.grpo.rewards import VisualAnchoredReward
    from megatron_avar.grpo.trainer import grpo_step
    from megatron_avar.training.megatron_setup import init_distributed

    init_distributed(1, 1, seed=0)
    config = load_config(GRPOConfig, None, ["out=/tmp/unused", "model.hf_path=/unused", "data.path=/unused",
                                            "rollout.n=2", "train.prompts_per_step=2"])
    prompts = PromptBatch(prompt_ids=list(PROMPTS), input_ids=[torch.tensor([1, 2])] * 2,
                          roles=[torch.tensor([0, 0])] * 2, pixel_values=[None] * 2, image_grid_thw=[None] * 2,
                          ground_truths=["1", "1"])
    policy, backend, reward = _DivergingPolicy(), _Backend(), VisualAnchoredReward(config.reward)
    try:
        for step in (3, 4):
            grpo_step(step, prompts, policy=policy, backend=backend, reward=reward, config=config)
    except ValueError as error:  # NonFiniteUpdateError is one; before the fix, the reward's ValueError
        return type(error).__name__, str(error)
    finally:
        parallel_state.destroy_model_parallel()
    return "no error", ""


@pytest.mark.multiprocess
def test_a_diverging_grpo_update_stops_at_its_step_and_is_named_as_the_update():
    (kind, message), = run_on_ranks(_two_steps_with_a_diverging_update, 1, timeout_s=120)
    assert kind == "NonFiniteUpdateError", message
    assert message.startswith("step 3: policy update 1 of 1 is not finite")
    assert "the updated weights hold NaN or inf" in message and "update diverged" in message
    assert all(prompt in message for prompt in PROMPTS) and "optim.lr" in message
    assert "mass" not in message and "r_visual" not in message


def test_grpo_config_refuses_a_nonfinite_learning_rate():
    from megatron_avar.config import load_config
    from megatron_avar.grpo.config import GRPOConfig

    base = ["out=o", "model.hf_path=m", "data.path=d"]
    for value in (".inf", ".nan", "0", "-1e-6"):
        with pytest.raises(ValueError, match=r"optim\.lr must be a finite number"):
            load_config(GRPOConfig, None, base + [f"optim.lr={value}"])
    assert math.isclose(load_config(GRPOConfig, None, base).optim.lr, 1e-6)


class _RecordingPolicy(_DivergingPolicy):
    """Records the advantages each update trains on; its updates leave the weights as they are."""

    def __init__(self):
        super().__init__()
        self.advantages = []

    def train_step(self, rollouts, old_logp, advantages, ref_logp=None):
        self.advantages.append(advantages.tolist())
        return {"loss/policy": 0.25, "loss/ratio_max": 1.0, "optim/grad_norm": 0.5, "optim/lr": 1e-6,
                "data/response_tokens": float(3 * len(rollouts))}


def _a_step_whose_grading_differs_between_tensor_parallel_ranks(cp: int):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_avar.config import load_config
    from megatron_avar.grpo.config import GRPOConfig
    from megatron_avar.grpo.interfaces import PromptBatch
    from megatron_avar.grpo.rewards import RewardParts
    from megatron_avar.grpo.trainer import grpo_step
    from megatron_avar.training.megatron_setup import init_distributed

    init_distributed(2 // cp, 1, seed=0, cp=cp)
    config = load_config(GRPOConfig, None, ["out=/tmp/unused", "model.hf_path=/unused", "data.path=/unused",
                                            "rollout.n=2", "train.prompts_per_step=2"])
    prompts = PromptBatch(prompt_ids=list(PROMPTS), input_ids=[torch.tensor([1, 2])] * 2,
                          roles=[torch.tensor([0, 0])] * 2, pixel_values=[None] * 2, image_grid_thw=[None] * 2,
                          ground_truths=["1", "1"])

    class RankDependentReward:  # a grading that timed out on rank 1 for the first rollout
        def score(self, response, truth, r_visual):
            correct = float(dist.get_rank() == 0 or not response.endswith("<answer>0</answer>"))
            return RewardParts(accuracy=correct, format=1.0, visual=0.0, total=correct + 0.5)

    policy = _RecordingPolicy()
    try:
        metrics = grpo_step(0, prompts, policy=policy, backend=_Backend(), reward=RankDependentReward(),
                            config=config)
    finally:
        parallel_state.destroy_model_parallel()
    return policy.advantages, metrics["reward/accuracy"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("cp", [1, 2])
def test_ranks_of_one_model_train_on_the_same_rewards_when_their_grading_differs(cp):
    """Tensor- (or context-) parallel ranks hold the same rollouts and grade them each; they train on the first
    rank's rewards. Before, each trained on its own advantages: replicated weights drifted apart, silently."""
    (first, accuracy0), (second, accuracy1) = run_on_ranks(_a_step_whose_grading_differs_between_tensor_parallel_ranks,
                                                           2, cp, timeout_s=180)
    assert first == second and accuracy0 == accuracy1 == 1.0
    assert first == [[0.0, 0.0, 0.0, 0.0]]  # rank 0's rewards: every rollout correct, so no advantage
