"""`perf/tflops_per_gpu` counts the global batch's FLOPs: a step's FLOPs do not depend on how its rows are spread
over data-parallel ranks. The ranks train as many rows each, not as many tokens: rank 0's FLOPs times DP (what
was logged before) were off by up to ±14% at DP=2 on these data."""

import pytest

from megatron_avar.testing import run_on_ranks
from sft_cases import sft_overrides

pytestmark = pytest.mark.multiprocess


def _step_flops(overrides, steps):
    from megatron.core import parallel_state

    from megatron_avar.config import load_config
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.sft.trainer import global_step_flops
    from megatron_avar.training.megatron_setup import init_distributed
    from megatron_avar.training.sft_data import SFTDataLoader

    config = load_config(SFTConfig, None, overrides)
    layout = init_distributed(1, 1, seed=0)
    qwen_config = Qwen25VLConfig.from_hf(config.model.hf_path)
    loader = SFTDataLoader(config.data, global_batch_size=config.train.global_batch_size, dp_rank=layout.dp_rank,
                           dp_size=layout.dp)
    batches = iter(loader)
    found = [(global_step_flops(next(batches), qwen_config, device="cpu"), layout.dp) for _ in range(steps)]
    parallel_state.destroy_model_parallel()
    return found


def test_a_steps_flops_are_the_same_at_any_data_parallel_size(sft_inputs, tmp_path):
    overrides = sft_overrides(sft_inputs, tmp_path / "run")
    alone = run_on_ranks(_step_flops, 1, overrides, 3, timeout_s=300)[0]
    two = run_on_ranks(_step_flops, 2, overrides, 3, timeout_s=300)
    assert [dp for _, dp in two[0]] == [2, 2, 2]
    for (single, _), (rank0, _), (rank1, _) in zip(alone, *two):
        assert rank0 == rank1 == pytest.approx(single, rel=1e-12)
