"""GRPO with the visual-anchored reward (AVAR_SPEC.md §6): the mathematics the loop is built on.

- ``rewards``: RewardConfig, score_rollout -> RewardParts (accuracy by math-verify, format, gated r_visual).
- ``visual_reward``: ResponseTokens, VisualRewardSink — r_visual per rollout from the masses of the
  old-log-prob forward pass, exact under tensor parallelism.
- ``advantages``: group_advantages (GRPO / Dr. GRPO group normalisation).
- ``loss``: PolicyLossConfig, policy_loss (PPO-clip ratio loss, k3 KL, token aggregation modes).
- ``interfaces``: Policy, GenerationBackend, Reward protocols and the Rollout / PromptBatch records.
"""
