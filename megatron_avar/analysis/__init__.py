"""Diagnostics and training-free interventions on attention by token role (AVAR_SPEC.md sections 1-3).

vas.py: the Visual Attention Score over per-layer role masses (any source: HF hook or megatron);
intervention.py: the logit-rescaling spec; hf_attention.py: role_attention inside a HF model;
batching.py: prompt-only batches; run_vas.py / run_intervene.py / compare.py: the `avar vas` and
`avar intervene` jobs; cli.py: their command lines.
"""
