"""The config.json layouts of the published Qwen2.5-VL-3B/7B/72B-Instruct checkpoints, for config and
parameter-count tests; they live in the package (``megatron_avar.models.qwen2_5_vl.published``), which `avar plan`
also reads."""

from megatron_avar.models.qwen2_5_vl.published import QWEN2_5_VL_3B, QWEN2_5_VL_7B, QWEN2_5_VL_72B  # noqa: F401
