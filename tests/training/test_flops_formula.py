"""The vision tower's part of the FLOP formula behind `perf/tflops_per_gpu` (and the benchmarks' TFLOP/s and
MFU) equals what torch counts in Hugging Face's Qwen2.5-VL vision tower: the patch embedding, every block's
matmuls, the merger on the merged tokens (it used to be counted once per patch, 4x), and the full-attention
blocks' scores and values over each whole image (not counted before). Every block attends over whole images
here, so nothing the formula leaves out (windowed attention) is in the count."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from qwen_vl_cases import tiny_hf_config  # noqa: E402


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 4, 6), (1, 8, 4), (2, 2, 2)]], ids=["one", "three"])
def test_vision_flops_equal_torchs_count_of_hf_vision_tower(grids):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.metrics import frame_patches, training_flops

    config = tiny_hf_config()
    config.vision_config.fullatt_block_indexes = list(range(config.vision_config.depth))
    config.vision_config._attn_implementation = "eager"  # matmuls torch's counter sees
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    grid = torch.tensor(grids)
    patches = frame_patches(grid)  # (2, 2, 2): two frames, each attended over alone
    pixels = torch.randn(sum(patches), 3 * 2 * 14 * 14)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.visual(pixels, grid_thw=grid)
    forward = training_flops(Qwen25VLConfig.from_hf(config), sample_lengths=[], image_patches=patches) / 3
    assert forward == counter.get_total_flops()


def test_text_flops_equal_torchs_count_of_hf_text_model():
    """The decoder's part (dense matmuls, the output layer, causal attention 2·L·d·s² per forward) against torch's
    count of Hugging Face's text model on packed samples run one by one (found in review: only the vision part was
    compared with a count; halving the attention term passed every test). Eager attention multiplies the whole
    s x s score matrix, the masked upper half too, which the formula leaves out: 2·L·d·s² more per sample."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.metrics import training_flops

    config = tiny_hf_config()
    config._attn_implementation = config.text_config._attn_implementation = "eager"  # matmuls the counter sees
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    lengths = [7, 19, 32]
    counted = 0
    for length in lengths:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(length)))
        counted += counter.get_total_flops()
    ours = Qwen25VLConfig.from_hf(config)
    forward = training_flops(ours, sample_lengths=lengths, image_patches=[]) / 3
    masked_half = 2 * ours.text.num_layers * ours.text.hidden_size * sum(s * s for s in lengths)
    assert forward + masked_half == counted
