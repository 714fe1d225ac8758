"""`avar vas` on a megatron checkpoint of ours (from `avar convert hf-to-mcore` or from training).

The model is loaded at TP=1, PP=1 (the checkpoint reshards on load) in one local rank, with every requested
layer an AVAR layer: its RoleMassCoreAttention computes ``out`` with the plain attention and probes only the VAS
query rows, whose masses go straight to the same VASAccumulator the HF path feeds, so both paths compute one
definition. Same batches, same report.json: the attention sink is a
key role of its own here too (``analysis.vas.mass_key_roles``), so both sink variants are reported.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

__all__ = ["run_vas_megatron"]


def run_vas_megatron(config) -> dict:
    """The report of ``config`` (a VASConfig) computed with the megatron model."""
    from megatron_avar.convert.checkpoint import read_checkpoint_info
    from megatron_avar.local_ranks import launch

    read_checkpoint_info(Path(config.model))  # a clear error before any process starts
    if config.device_map is not None or config.device not in ("auto", "cpu", "cuda"):
        raise ValueError("--device-map / --device cuda:N apply to HF checkpoints; a megatron checkpoint runs on one "
                         "local rank (its device chosen by the platform)")
    launch(_rank, 1, config)
    return json.loads((Path(config.out) / "report.json").read_text())


class _QueryRowsSink:
    """The mass sink of a VAS pass: it declares the VAS query rows, so each AVAR layer computes ``out`` with the
    plain attention and probes only those rows (``models.role_mass_attention``), and it hands their masses
    [N, H, R] to the accumulator (TP=1: every head is local)."""

    def __init__(self, query_rows, on_mass):
        self.query_rows, self._on_mass = query_rows, on_mass

    def __call__(self, layer_index, mass, out, heads):
        self._on_mass(layer_index, mass)
        return out


def _rank(config) -> None:
    import torch
    from megatron.core import parallel_state

    from megatron_avar import platform
    from megatron_avar.analysis.batching import collate_prompts, prompt_samples
    from megatron_avar.analysis.run_vas import accumulate_vas, write_vas_report
    from megatron_avar.analysis.vas import MASS_NUM_ROLES, mass_key_roles, vas_query_rows
    from megatron_avar.convert.checkpoint import DTYPES, HF_SIDE_DIR, load_model_weights, read_checkpoint_info
    from megatron_avar.models.hf_inference import pad_token_id
    from megatron_avar.models.layer_sets import parse_layers
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import build_stage, init_model_parallel
    from megatron_avar.processor import load_processor

    started = time.time()
    mcore_dir = Path(config.model)
    info = read_checkpoint_info(mcore_dir)
    qwen = Qwen25VLConfig.from_hf(str(mcore_dir / HF_SIDE_DIR))
    layers = parse_layers(config.layers, qwen.text.num_layers)
    dtype = DTYPES[info["dtype"]] if config.dtype == "auto" else getattr(torch, config.dtype)
    processor = load_processor(mcore_dir / HF_SIDE_DIR)  # refused here, before the model is built and loaded
    try:
        init_model_parallel(1, 1, seed=0)
        model = build_stage(qwen, tp=1, pp=1, dtype=dtype, role_mass_layers=layers, device=platform.current_device())
        load_model_weights(model, mcore_dir)
        model.eval()
        samples = prompt_samples(config.data, processor, num_samples=config.num_samples, shard=config.shard_index)
        pad_id = pad_token_id(processor.tokenizer)
        device = platform.current_device()
        batches = (collate_prompts(samples[start:start + config.batch_size], pad_token_id=pad_id,
                                   image_token_id=processor.image_token_id).to(device)
                   for start in range(0, len(samples), config.batch_size))

        no_rows = torch.zeros(0, dtype=torch.long, device=device)

        def forward(batch, on_mass):
            inputs = batch.inputs
            sink = _QueryRowsSink(vas_query_rows(batch.roles).to(device), on_mass)
            with torch.no_grad():
                model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                      token_roles=mass_key_roles(batch.roles).to(device), num_roles=MASS_NUM_ROLES,
                      mass_sink=sink, role_attention_impl=config.impl,
                      output_rows=no_rows)  # VAS reads masses only: no logits

        accumulator = accumulate_vas(batches, forward, layers, qwen.text.num_attention_heads)
        write_vas_report(
            accumulator, config.out, exclude_sink=config.exclude_sink,
            name=config.name or mcore_dir.resolve().name,
            config=dict(asdict(config), layers_resolved=list(layers), num_model_layers=qwen.text.num_layers),
            checkpoint=dict(path=str(mcore_dir.resolve()), format="megatron torch_dist", info=info),
            runtime=dict(seconds=round(time.time() - started, 2), device=str(device), backend="megatron",
                         num_records_rendered=len(samples)))
    finally:
        parallel_state.destroy_model_parallel()
