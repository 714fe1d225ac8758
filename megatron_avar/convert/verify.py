"""`avar convert verify`: one batch (text and an image) through the HF model and through the megatron model
loaded from a converted checkpoint; the logits must agree.

Both sides run in float32 by default, whatever the checkpoints store: a bfloat16 checkpoint's weights are upcast
exactly on both sides, so what is compared is the conversion (names, splits, layouts), not two implementations'
bfloat16 rounding (which alone differs by ~5e-2 in logits at toy sizes, hiding any conversion error smaller than
that). ``dtype=torch.bfloat16`` halves the memory of both models (a 72B check in float32 holds 2 x 290 GB on the
host) and then compares that rounding too: raise the tolerance with it."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from megatron_avar.convert import checkpoint
from megatron_avar.models.hf_weights import safetensors_files

VERIFY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def verification_batch(config, *, seed: int = 0) -> dict:
    """input_ids [1, S] = 6 text tokens, <vision_start>, image tokens of a 4x4-patch image, <vision_end>,
    6 text tokens; pixel_values [16, patch_dim]; image_grid_thw [[1, 4, 4]]. Text ids avoid special ids."""
    generator = torch.Generator().manual_seed(seed)
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id}
    high = min(config.text.vocab_size, 1000)
    candidates = torch.tensor([i for i in range(high) if i not in special])
    text = lambda n: candidates[torch.randint(len(candidates), (n,), generator=generator)].tolist()  # noqa: E731
    merge = config.vision.spatial_merge_size
    grid = (1, 2 * merge, 2 * merge)
    num_image_tokens = grid[1] * grid[2] // merge**2
    ids = text(6) + [config.vision_start_token_id] + [config.image_token_id] * num_image_tokens + \
        [config.vision_end_token_id] + text(6)
    v = config.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(grid[1] * grid[2], patch_dim, generator=generator),
            "image_grid_thw": torch.tensor([grid])}


def verify_rank(mcore_dir: str, tp: int, pp: int, batch: dict, out_file: str, dtype: torch.dtype) -> None:
    """One rank of the megatron side: the checkpoint loaded at TP=tp x PP=pp on the rank's device (its GPU where
    there is one: Transformer Engine's modules run only there), the batch run forward (through megatron's pipeline
    schedule when pp > 1); the last stage's first TP rank saves the gathered logits."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import build_stage, init_model_parallel

    config = Qwen25VLConfig.from_hf(str(Path(mcore_dir) / checkpoint.HF_SIDE_DIR))
    try:
        init_model_parallel(tp, pp, seed=0)
        device = platform.current_device()
        model = build_stage(config, tp=tp, pp=pp, dtype=dtype, device=device)
        checkpoint.load_model_weights(model, Path(mcore_dir))
        batch = {name: value.to(device) for name, value in batch.items()}
        model.eval()
        outputs = []

        def forward_step(data_iterator, stage_model):
            inputs = next(data_iterator)
            output = stage_model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 pixel_values=inputs["pixel_values"].to(dtype), image_grid_thw=inputs["image_grid_thw"])

            def keep_logits(logits):
                outputs.append(logits.detach())
                return logits.sum() * 0, {}

            return output, keep_logits

        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                        num_microbatches=1, seq_length=batch["input_ids"].shape[1],
                                        micro_batch_size=batch["input_ids"].shape[0], forward_only=True)
        if parallel_state.is_pipeline_last_stage():
            logits = gather_from_tensor_model_parallel_region(outputs[0], group=model.language_model.pg_collection.tp)
            if parallel_state.get_tensor_model_parallel_rank() == 0:
                torch.save(logits.float().cpu(), out_file)
    finally:
        parallel_state.destroy_model_parallel()


def _differing_fields(a, b, prefix: str = "") -> list[str]:
    """"field: a vs b" for each field of two (nested) config dataclasses that differs."""
    differing = []
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            differing += _differing_fields(x, y, f"{prefix}{field.name}.")
        elif x != y:
            differing.append(f"{prefix}{field.name}: {x} vs {y}")
    return differing


def verify(hf_dir: Path, mcore_dir: Path, *, tp: int, pp: int,
           dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(max, mean) absolute logit difference between HF and megatron on :func:`verification_batch`, both run in
    ``dtype`` (module docstring)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig

    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got {tp} and {pp}")
    checkpoint.read_checkpoint_info(mcore_dir)  # refused here, before HF loads, if it is not one
    safetensors_files(Path(hf_dir))  # a folder with weights (not a file, not a checkpoint's weightless hf/)
    config = Qwen25VLConfig.from_hf(str(hf_dir))
    differing = _differing_fields(config, Qwen25VLConfig.from_hf(str(Path(mcore_dir) / checkpoint.HF_SIDE_DIR)))
    if differing:
        raise ValueError(f"--hf-path {hf_dir} holds another model than --mcore-path {mcore_dir} ({', '.join(differing)}"
                         "): verify compares a checkpoint with the HF model it was converted from or exported to")
    config.check_layout(tp=tp, pp=pp)
    batch = verification_batch(config)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"].to(dtype), image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=(batch["input_ids"] == config.image_token_id).int()).logits.float()
    with tempfile.TemporaryDirectory() as temp:
        out_file = str(Path(temp) / "logits.pt")
        checkpoint.launch(verify_rank, tp * pp, str(mcore_dir), tp, pp, batch, out_file, dtype)
        ours = torch.load(out_file)
    diff = (ours - hf_logits).abs()
    return diff.max().item(), diff.mean().item()
