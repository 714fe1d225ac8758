"""`avar grpo`: GRPO with the visual reward on a Megatron actor (docs/method.md, 'Visual-anchored reward (GRPO)').

The mathematics:
- ``rewards``: RewardConfig, score_rollout -> RewardParts (accuracy by math-verify, format, gated r_visual).
- ``visual_reward``: ResponseTokens, VisualRewardSink — r_visual per rollout from the masses of the
  old-log-prob forward pass, exact under tensor and pipeline parallelism.
- ``advantages``: group_advantages (GRPO / Dr. GRPO group normalisation).
- ``loss``: PolicyLossConfig, policy_loss (PPO-clip ratio loss, k3 KL, token aggregation modes).
The loop and what it is written against:
- ``interfaces``: Policy, GenerationBackend, Reward protocols and the Rollout / PromptBatch records.
- ``prompts``: GRPODataConfig, PromptLoader — per-step prompts of one data-parallel rank, resumable.
- ``policy``: MegatronPolicy (log-probs + r_visual in one pass, the update, HF-named weights for refit),
  over ``rollout_batches`` (rollouts packed into rows and back to the [N, T] response layout).
- ``local_backend`` (HF with a KV cache) and ``vllm_backend`` (colocated vLLM; its requests and answers in
  ``vllm_requests``): the generation backends, built by name through the registry in ``backends``.
- ``trainer`` (run_grpo, grpo_step), ``rollout_metrics``, ``config`` (GRPOConfig), ``cli`` (`avar grpo`).
"""
