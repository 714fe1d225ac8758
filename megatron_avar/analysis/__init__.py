"""Diagnostics and training-free interventions on attention by token role (docs/method.md).

vas.py: the Visual Attention Score over per-layer role masses (any source: HF hook or megatron);
vas_parallel.py: packed (THD) masses and pipeline-stage merging for that accumulator;
intervention.py: the logit-rescaling spec; hf_attention.py: role_attention inside a HF model;
megatron_vas.py: `avar vas` on a megatron checkpoint (masses from the model's AVAR layers);
batching.py: prompt-only batches; run_vas.py / run_intervene.py / compare.py: the `avar vas` and
`avar intervene` jobs (answers graded by ``megatron_avar.grading.INTERVENTION``); stats.py, figures.py,
model_loading.py: their pieces (layer sets: ``models.layer_sets``; HF loading, stop/pad ids and left-padded
batches: ``models.hf_inference``, shared with eval and the GRPO rollout backend);
cli.py: the command lines.
"""
