"""Tiny random Qwen2.5-VL models and batches shared by the tests in tests/models/.

Sizes are chosen so that every structural feature is exercised: GQA (4 query heads, 2 groups), vision windows
of 2x2 merged tokens with edge windows of other sizes, full attention in vision block 1 of 3, images whose
merged grids are non-square, smaller than a window, and exact multiples of it.
"""

from __future__ import annotations

import torch

IMAGE, VIDEO, VISION_START, VISION_END = 250, 251, 252, 253
VOCAB = 256
TEXT_TOKENS = (1, 200)  # ids drawn for text: well away from the special ids above

# Grids (T, H, W) in patches; merged grids are H/2 x W/2. Window side = 56 / (14 * 2) = 2 merged tokens.
GRID_A = (1, 4, 6)   # 2x3 merged: one full window + one 2x1 edge window
GRID_B = (1, 6, 4)   # 3x2 merged: edge window at the bottom
GRID_C = (1, 8, 8)   # 4x4 merged: four full windows (no edge)
GRID_D = (1, 2, 2)   # one merged token, smaller than a window


def tiny_hf_config(*, tie_word_embeddings: bool = False, num_text_layers: int = 3):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_text_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie_word_embeddings,
    )


def tiny_hf_model(seed: int = 0, *, tie_word_embeddings: bool = False, num_text_layers: int = 3):
    """fp32, eval mode, weights drawn with a larger std than HF's init (0.02) so that every layer matters.

    Norm weights are 1 + noise (not exactly 1) so that a norm mapped to the wrong place is noticed.
    ``num_text_layers``: 4 for pipeline tests (megatron splits layers evenly over the stages)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(
        tiny_hf_config(tie_word_embeddings=tie_word_embeddings, num_text_layers=num_text_layers))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_q" in name else 0.08 * noise)
    return model.eval()


def image_tokens(grid) -> list[int]:
    t, h, w = grid
    return [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]


def sample(generator, pieces) -> list[int]:
    """pieces: ints (that many random text tokens) and grids (an image placeholder), concatenated."""
    ids = []
    for piece in pieces:
        if isinstance(piece, int):
            ids += torch.randint(*TEXT_TOKENS, (piece,), generator=generator).tolist()
        else:
            ids += image_tokens(piece)
    return ids


def batch(samples, grids, *, seed: int = 0, padding_side: str = "right"):
    """input_ids [B, S], attention_mask [B, S] (1 = real), pixel_values, image_grid_thw for `samples`
    (lists of pieces as in :func:`sample`); `grids` lists every image of the batch in order."""
    generator = torch.Generator().manual_seed(seed)
    rows = [sample(generator, pieces) for pieces in samples]
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(length - len(row), length)
        input_ids[b, span] = torch.tensor(row)
        attention_mask[b, span] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if grids:
        image_grid_thw = torch.tensor(grids, dtype=torch.long)
        num_patches = int(image_grid_thw.prod(-1).sum())
        out["pixel_values"] = torch.randn(num_patches, 3 * 2 * 14 * 14, generator=generator)
        out["image_grid_thw"] = image_grid_thw
    return out


# The batches the logit tests use: name -> (samples, grids, padding side)
CASES = {
    "text_only": ([[12], [12]], [], "right"),
    "one_image": ([[5, GRID_A, 6]], [GRID_A], "right"),
    "several_images": ([[3, GRID_A, 4, GRID_C, 2, GRID_D, 5], [2, GRID_B, 7]], [GRID_A, GRID_C, GRID_D, GRID_B],
                       "right"),
    "padded_right": ([[4, GRID_B, 3], [3, GRID_A, 9, GRID_D, 6], [9]], [GRID_B, GRID_A, GRID_D], "right"),
    "padded_left": ([[4, GRID_B, 3], [3, GRID_A, 9, GRID_D, 6]], [GRID_B, GRID_A, GRID_D], "left"),
}


def case_batch(name: str, seed: int = 0):
    samples, grids, side = CASES[name]
    return batch(samples, grids, seed=seed, padding_side=side)


def hf_logits(model, inputs) -> torch.Tensor:
    """HF logits with the inputs HF needs to use 3-D positions (`mm_token_type_ids`, see
    docs/installation.md, 'Known dependency quirks')."""
    mm_token_type_ids = (inputs["input_ids"] == IMAGE).int()
    with torch.no_grad():
        return model(**inputs, mm_token_type_ids=mm_token_type_ids).logits
