"""VAS of the evaluated model on the first N samples of a benchmark (`avar eval --vas-samples N`), so a results
table can carry the Visual Attention Score next to accuracy (docs/method.md, 'Visual Attention Score (VAS)':
prompt-only prefill, all layers
and heads, the sink in K_sys). The prompts are the benchmark's own, rendered as for generation; the
attention goes through the same hook (plain attention, the probe on the VAS query rows) and accumulator as
`avar vas`.
"""

from __future__ import annotations

from pathlib import Path

from megatron_avar import atomic_files

__all__ = ["benchmark_vas", "vas_path", "read_vas", "write_vas"]

VAS_KEYS = ("vas", "vas_no_sink", "ratio_of_means", "image_share", "num_samples")


def vas_path(out: Path, benchmark: str) -> Path:
    return Path(out) / "vas" / f"{benchmark}.json"


def read_vas(out: Path, benchmark: str) -> dict | None:
    """The VAS a run wrote for ``benchmark`` into ``out`` (None: none); a damaged file is named."""
    from megatron_avar.eval.run_folder import read_json

    return read_json(vas_path(out, benchmark), fix="delete it; `avar eval --vas-samples N` computes it again")


def benchmark_vas(model, processor, samples, *, batch_size: int, device) -> dict:
    """{vas, vas_no_sink, ratio_of_means, image_share, num_samples} over ``samples`` (benchmark samples with
    ``.id`` and ``.content``, the user turn) for an HF Qwen2.5-VL ``model``."""
    from megatron_avar.analysis.batching import PromptSample, collate_prompts
    from megatron_avar.analysis.run_vas import accumulate_hf_vas
    from megatron_avar.models.hf_inference import pad_token_id
    from megatron_avar.roles import render_conversation

    prompts = [PromptSample(id=s.id, rendered=render_conversation([{"role": "user", "content": s.content}], processor,
                                                                  add_generation_prompt=True), answer=None)
               for s in samples]
    layers = tuple(range(model.config.text_config.num_hidden_layers))
    pad_id = pad_token_id(processor.tokenizer, model.generation_config)
    batches = (collate_prompts(prompts[i:i + batch_size], pad_token_id=pad_id,
                               image_token_id=processor.image_token_id).to(device)
               for i in range(0, len(prompts), batch_size))
    accumulator = accumulate_hf_vas(model, batches, layers)
    report = accumulator.result().to_json(exclude_sink=False)
    excluded = report["variants"].get("sink_excluded")  # None when the masses have the sink inside SYSTEM
    report["vas_no_sink"] = None if excluded is None else excluded["vas"]
    return {key: report[key] for key in VAS_KEYS}


def write_vas(out: Path, benchmark: str, result: dict) -> None:
    atomic_files.write_json(vas_path(out, benchmark), result)
