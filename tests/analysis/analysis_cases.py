"""A chat-like batch with known token roles for the tiny random Qwen2.5-VL model of tests/models.

Rows (left-padded): one image; two images with user text before, between and after them; no image at all
(no VAS queries: skipped). Roles are assigned here from the pieces, the way the renderer would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from qwen_vl_cases import IMAGE, TEXT_TOKENS, VISION_END, VISION_START, tiny_hf_model  # noqa: E402,F401

EPS = 1e-6  # docs/method.md, 'Visual Attention Score (VAS)' (written here, not imported: this is the ground truth)
from megatron_avar.roles import TokenRole  # noqa: E402

ROLE_OF = {"sys": TokenRole.SYSTEM, "tmpl": TokenRole.TEMPLATE, "user": TokenRole.USER_TEXT, "resp": TokenRole.RESPONSE}
ROWS = [
    [("sys", 5), ("tmpl", 2), ("img", (1, 4, 6)), ("user", 6), ("tmpl", 3)],
    [("sys", 4), ("tmpl", 2), ("user", 3), ("img", (1, 6, 4)), ("user", 4), ("img", (1, 2, 2)), ("user", 2),
     ("tmpl", 3)],
    [("sys", 5), ("tmpl", 2), ("user", 8), ("tmpl", 3)],
]


def role_batch(rows=ROWS, seed: int = 0):
    """(model inputs, roles [B, S] with PAD = -1) for ``rows`` of (kind, count or image grid) pieces."""
    generator = torch.Generator().manual_seed(seed)
    encoded, grids = [], []
    for pieces in rows:
        ids, roles = [], []
        for kind, n in pieces:
            if kind == "img":
                t, h, w = n
                count = t * h * w // 4
                ids += [VISION_START] + [IMAGE] * count + [VISION_END]
                roles += [TokenRole.TEMPLATE] + [TokenRole.IMAGE] * count + [TokenRole.TEMPLATE]
                grids.append(n)
            else:
                ids += torch.randint(*TEXT_TOKENS, (n,), generator=generator).tolist()
                roles += [ROLE_OF[kind]] * n
        encoded.append((ids, [int(r) for r in roles]))
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    roles = torch.full((len(rows), length), int(TokenRole.PAD), dtype=torch.long)
    for b, (ids, row_roles) in enumerate(encoded):
        input_ids[b, length - len(ids):] = torch.tensor(ids)
        attention_mask[b, length - len(ids):] = 1
        roles[b, length - len(ids):] = torch.tensor(row_roles)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=(input_ids == IMAGE).long())
    if grids:
        grid_thw = torch.tensor(grids, dtype=torch.long)
        inputs["pixel_values"] = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14, generator=generator)
        inputs["image_grid_thw"] = grid_thw
    return inputs, roles


def direct_vas(probs, roles, layers, exclude_sink):
    """Per-sample dicts of the definitions, straight from probabilities [B, H, S, S] per layer."""
    out = {}
    for b in range(roles.shape[0]):
        row = roles[b].tolist()
        if TokenRole.IMAGE not in row:
            continue
        first_image = row.index(TokenRole.IMAGE)
        queries = [i for i, r in enumerate(row) if r == TokenRole.USER_TEXT and i > first_image]
        sink = next(i for i, r in enumerate(row) if r >= 0)
        img_keys = [j for j, r in enumerate(row) if r == TokenRole.IMAGE]
        sys_keys = [j for j, r in enumerate(row) if r == TokenRole.SYSTEM and not (exclude_sink and j == sink)]
        ratio = torch.zeros(len(layers), probs[0].shape[1], dtype=torch.float64)
        img = torch.zeros_like(ratio)
        sys = torch.zeros_like(ratio)
        for k, layer in enumerate(layers):
            p = probs[layer][b]                                   # [H, S, S]
            for i in queries:
                m_img, m_sys = p[:, i, img_keys].sum(-1), p[:, i, sys_keys].sum(-1)
                ratio[k] += m_img / (m_sys + EPS) / len(queries)
                img[k] += m_img / len(queries)
                sys[k] += m_sys / len(queries)
        out[b] = dict(ratio=ratio, img=img, sys=sys)
    return out
