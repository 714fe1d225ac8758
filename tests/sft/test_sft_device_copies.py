"""What the SFT step copies to the device before the schedule: every per-token tensor of every micro-batch, but
not the pixels (the model's first pipeline stage copies each micro-batch's as it starts; before, the whole step's
pixels sat on the device at once, ~150 MB per 16k-token half-image row, on every pipeline stage) nor the image
grids (read on the host)."""

import dataclasses

import torch


@dataclasses.dataclass
class _MicroBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    sample_ids: list


def test_the_step_copies_the_per_token_tensors_and_leaves_the_pixels_on_the_host():
    from megatron_avar.sft.trainer import _to_device

    batch = _MicroBatch(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long),
                        pixel_values=torch.zeros(16, 1176), image_grid_thw=torch.tensor([[1, 4, 4]]),
                        sample_ids=[["a"]])
    moved = _to_device(batch, torch.device("meta"))  # a device nothing is really copied to
    assert moved.input_ids.is_meta and moved.labels.is_meta
    assert moved.pixel_values is batch.pixel_values and moved.image_grid_thw is batch.image_grid_thw
    assert moved.sample_ids is batch.sample_ids
