"""Training: SFT data (packing, per-step loader); the trainer builds on these."""

from megatron_avar.training.packing import PackedBatch, PackedRow, collate_rows, first_fit_decreasing, pack_row
from megatron_avar.training.sft_data import SFTDataConfig, SFTDataLoader, SFTStep, build_processor, pack_epoch

__all__ = ["PackedBatch", "PackedRow", "collate_rows", "first_fit_decreasing", "pack_row",
           "SFTDataConfig", "SFTDataLoader", "SFTStep", "build_processor", "pack_epoch"]
