"""3-D rope position ids equal HF's `get_rope_index`; the vision packing (window order, segment lengths,
2-D rotary positions) equals HF's `get_vision_window_index` / `get_vision_position_ids`."""

import pytest
import torch

from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig, mrope_position_ids
from qwen_vl_cases import CASES, GRID_A, GRID_B, GRID_C, GRID_D, IMAGE, batch, case_batch, tiny_hf_config


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLModel

    return Qwen2_5_VLModel(tiny_hf_config()).eval()


def _hf_rope_index(hf_model, inputs):
    return hf_model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=(inputs["input_ids"] == IMAGE).int(),
        image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"],
    )


def _ours(inputs, **kwargs):
    return mrope_position_ids(inputs["input_ids"], inputs.get("image_grid_thw"), image_token_id=IMAGE,
                              spatial_merge_size=2, attention_mask=inputs["attention_mask"], **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_position_ids_equal_hf(hf_model, name):
    inputs = case_batch(name)
    expected, expected_deltas = _hf_rope_index(hf_model, inputs)
    positions, deltas = _ours(inputs)
    assert positions.dtype == torch.long and positions.shape == (3,) + tuple(inputs["input_ids"].shape)
    assert torch.equal(positions, expected)
    assert torch.equal(deltas, expected_deltas)


def test_position_ids_equal_hf_on_random_layouts(hf_model):
    generator = torch.Generator().manual_seed(5)
    grids = [GRID_A, GRID_B, GRID_C, GRID_D, (1, 2, 8), (1, 10, 4)]
    for trial in range(20):
        samples, used = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            pieces = [int(torch.randint(1, 6, (1,), generator=generator))]
            for _ in range(int(torch.randint(0, 3, (1,), generator=generator))):
                grid = grids[int(torch.randint(len(grids), (1,), generator=generator))]
                pieces += [grid, int(torch.randint(1, 6, (1,), generator=generator))]
                used.append(grid)
            samples.append(pieces)
        side = ("left", "right")[trial % 2]
        inputs = batch(samples, used, seed=trial, padding_side=side)
        expected, expected_deltas = _hf_rope_index(hf_model, inputs)
        positions, deltas = _ours(inputs)
        assert torch.equal(positions, expected), (samples, side)
        assert torch.equal(deltas, expected_deltas), (samples, side)


def test_image_position_ids_by_hand():
    # 2 text tokens, an image of 2x3 merged tokens, 1 text token: t/h/w grids start at 2, text resumes at 2 + 3.
    inputs = {"input_ids": torch.tensor([[7, 8] + [IMAGE] * 6 + [9]]), "attention_mask": None,
              "image_grid_thw": torch.tensor([GRID_A])}
    positions, deltas = _ours(inputs)
    assert positions[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5],
        [0, 1, 2, 2, 2, 3, 3, 3, 5],
        [0, 1, 2, 3, 4, 2, 3, 4, 5],
    ]
    assert deltas.tolist() == [[6 - 9]]


def test_mismatched_image_tokens_name_both_counts():
    inputs = case_batch("one_image")
    inputs["image_grid_thw"] = torch.tensor([GRID_C])  # 16 tokens, the text has 6
    with pytest.raises(ValueError, match="6 image tokens but image_grid_thw describes 1 images with 16 tokens"):
        _ours(inputs)
    split = torch.tensor([[1] + [IMAGE] * 3 + [5] + [IMAGE] * 3])  # 6 image tokens, not consecutive
    with pytest.raises(ValueError, match="image 0 .* needs 6 consecutive image tokens from token 1"):
        mrope_position_ids(split, torch.tensor([GRID_A]), image_token_id=IMAGE, spatial_merge_size=2)


@pytest.mark.parametrize("grid,match", [
    ([[1, 3, 4]], "image grid 1x3x4 is not an image the processor gives"),  # was a raw expand RuntimeError
    ([[1, 0, 4]], "image grid 1x0x4"),
    ([1, 4, 6], r"image_grid_thw must be an integer tensor \[num_images, 3\]"),
    ([[1.0, 4.0, 6.0]], "image_grid_thw must be an integer tensor"),
])
def test_grids_no_processor_gives_are_named(grid, match):
    from megatron_avar.models.qwen2_5_vl.vision import vision_packing

    ids = torch.tensor([[7] + [IMAGE] * 3 + [9]])
    with pytest.raises(ValueError, match=match):
        mrope_position_ids(ids, torch.tensor(grid), image_token_id=IMAGE, spatial_merge_size=2)
    with pytest.raises(ValueError, match=match):
        vision_packing(torch.tensor(grid), Qwen25VLConfig.from_hf(tiny_hf_config()).vision)


@pytest.mark.parametrize("grids", [[GRID_A], [GRID_B, GRID_C, GRID_D], [(1, 10, 4), (2, 4, 6), (1, 2, 8)]])
def test_vision_packing_equals_hf(grids):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    from megatron_avar.models.qwen2_5_vl.vision import vision_packing

    config = Qwen25VLConfig.from_hf(tiny_hf_config()).vision
    grid_thw = torch.tensor(grids)
    packing = vision_packing(grid_thw, config)
    window_index, cu_window_seqlens = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=56,
                                                              patch_size=14)
    merged_order = packing.order.view(-1, 4)[:, 0] // 4
    assert torch.equal(packing.order, (merged_order[:, None] * 4 + torch.arange(4)).flatten())  # groups move whole
    assert torch.equal(merged_order, window_index)
    assert torch.equal(packing.cu_windows, cu_window_seqlens)
    frame_lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    assert torch.equal(packing.cu_frames[1:], frame_lengths.cumsum(0).to(torch.int32))
    hw = get_vision_position_ids(grid_thw, 2)  # processor order
    assert torch.equal(packing.rotary_hw, hw[packing.order])
    assert torch.equal(merged_order[packing.inverse_merged_order], torch.arange(len(merged_order)))
