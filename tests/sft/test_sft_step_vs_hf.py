"""One AVAR SFT step of the trainer, on one rank, equals the objective computed from Hugging Face's Qwen2.5-VL:
every packed sample run alone through HF with eager attention, its per-role masses summed from HF's attention
probabilities, and L = L_LM + α·L_enh + β·L_sup written out from the definition (docs/method.md, 'AGTO
objective'; training/objective.py's docstring). Compared: the LM loss, L_enh, L_sup, VAS and the image share, and
the gradient norm of L over all parameters (megatron's, before clipping, against autograd on the HF model), with
and without the attention sink in K_sys.

Found in review: every other SFT step test compares the trainer with itself (layouts, recompute, mass modes), so a
bug common to all of them passed: the trainer dropping the packed rows' segment ids (samples attending to each
other), a halved AGTO weight, the sink left in K_sys.

Tolerance: fp32 on both sides, other kernels and summation orders (~1e-6 relative observed): 1e-4 relative.
"""

import pytest
import torch

from megatron_avar.testing import run_on_ranks
from sft_cases import sft_overrides

pytestmark = pytest.mark.multiprocess

ALPHA, BETA, EPS = 0.15, 0.15, 1e-6


def _one_step(overrides):
    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.sft.trainer import build_run, train_step
    from megatron_avar.training.megatron_setup import init_distributed

    config = load_config(SFTConfig, None, overrides)
    layout = init_distributed(1, 1, seed=config.train.seed)
    run = build_run(config, layout)
    batch = next(iter(run.data))
    metrics = train_step(run.model, batch, config, avar_layers=run.avar_layers, layout=layout)
    return metrics, batch.microbatches, run.avar_layers


def _samples(microbatches, image_token_id: int):
    """(input_ids, labels, roles, pixel_values, image_grid_thw) of every packed sample, alone."""
    for mb in microbatches:
        grids = list(mb.image_grid_thw) if mb.image_grid_thw is not None else []
        pixels = mb.pixel_values
        offset = 0  # the next image's first patch row
        for row, bounds in enumerate(mb.cu_seqlens):
            for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                ids = mb.input_ids[row, start:end]
                image_tokens, used = int((ids == image_token_id).sum()), []
                while sum(int(g.prod()) // 4 for g in used) < image_tokens:
                    used.append(grids.pop(0))
                patches = sum(int(g.prod()) for g in used)
                pv = pixels[offset:offset + patches] if used else None
                offset += patches
                yield (ids, mb.labels[row, start:end], mb.roles[row, start:end], pv,
                       torch.stack(used) if used else None)


def _hf_objective(hf_path, microbatches, avar_layers, exclude_sink: bool):
    """(metrics, grad_norm) of the step's global batch from HF, by the definition."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_avar.roles import IGNORE_INDEX, TokenRole

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_path, dtype=torch.float32,
                                                               attn_implementation="eager")
    model.train()  # (no dropout in Qwen2.5-VL) gradients on
    image_id = model.config.image_token_id
    lm_sum, tokens, terms, metrics = 0.0, 0, [], {"l_enh": [], "l_sup": [], "vas": [], "image_share": []}
    for ids, labels, roles, pixels, grid in _samples(microbatches, image_id):
        inputs = dict(input_ids=ids[None], mm_token_type_ids=(ids[None] == image_id).int())
        if pixels is not None:
            inputs.update(pixel_values=pixels, image_grid_thw=grid)
        out = model(**inputs, output_attentions=True)
        labelled = labels != IGNORE_INDEX
        lm_sum = lm_sum + torch.nn.functional.cross_entropy(out.logits[0][labelled], labels[labelled],
                                                            reduction="sum")
        tokens += int(labelled.sum())
        key_roles = roles.clone()
        if exclude_sink:
            key_roles[0] = TokenRole.TEMPLATE
        image_keys, system_keys = key_roles == TokenRole.IMAGE, key_roles == TokenRole.SYSTEM
        first_image = int(torch.nonzero(roles == TokenRole.IMAGE)[0]) if bool(image_keys.any()) else len(roles)
        queries = (roles == TokenRole.USER_TEXT) & (torch.arange(len(roles)) > first_image)
        if not (queries.any() and image_keys.any() and system_keys.any()):
            continue  # no AGTO term (objective's docstring)
        l_enh, l_sup, vas, share = [], [], [], []
        for layer in avar_layers:
            probs = out.attentions[layer][0][:, queries]  # [H, |Q|, s]
            m_img, m_sys = probs[..., image_keys].sum(-1), probs[..., system_keys].sum(-1)  # [H, |Q|]
            a = m_img.mean(1) / int(image_keys.sum())
            b = m_sys.mean(1) / int(system_keys.sum())
            l_enh.append(-torch.log(a + EPS).mean())
            l_sup.append(torch.log(b + EPS).mean())
            vas.append((m_img / (m_sys + EPS)).mean().detach())
            share.append(m_img.mean().detach())
        l_enh, l_sup = torch.stack(l_enh).mean(), torch.stack(l_sup).mean()
        terms.append(ALPHA * l_enh + BETA * l_sup)
        for name, value in (("l_enh", l_enh), ("l_sup", l_sup), ("vas", torch.stack(vas).mean()),
                            ("image_share", torch.stack(share).mean())):
            metrics[name].append(float(value.detach()))
    assert len(terms) >= 2, "the batch must hold samples with an AGTO term"
    loss = lm_sum / tokens + torch.stack(terms).mean()
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return {"loss/lm": float(lm_sum) / tokens, **{f"avar/{k}": sum(v) / len(v) for k, v in metrics.items()}}, \
        float(grad_norm)


@pytest.mark.parametrize("exclude_sink", [False, True], ids=["sink-in-k_sys", "sink-excluded"])
def test_one_step_equals_the_objective_computed_from_hf(sft_inputs, tmp_path, exclude_sink):
    overrides = sft_overrides(sft_inputs, tmp_path / "run", **{
        "parallel.tensor_model_parallel_size": 1, "avar.alpha": ALPHA, "avar.beta": BETA, "avar.epsilon": EPS,
        "avar.exclude_sink": exclude_sink, "optim.clip_grad": 0.0})
    metrics, microbatches, avar_layers = run_on_ranks(_one_step, 1, overrides, timeout_s=300)[0]
    assert len(avar_layers) == 2 and sum(len(row) for mb in microbatches for row in mb.sample_ids) > 2  # packed
    want, want_grad_norm = _hf_objective(sft_inputs["hf_path"], microbatches, avar_layers, exclude_sink)
    for name, value in want.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4), name
    assert metrics["optim/grad_norm"] == pytest.approx(want_grad_norm, rel=1e-4)
