"""`avar intervene`: generate answers with the attention intervention on, grade them, optionally sweep.

Greedy HF generate with the KV cache, the text attention through role_attention (hf_attention.py) with the
InterventionSpec's logit edits; answers graded against each record's ``answer`` by ``grading.INTERVENTION``
(lenient: a tag, a box, else the last number; docs/grading.md).
Single run: ``out`` (JSON) holds the config, the checkpoint identity, the accuracy and every sample.
Sweep: one run without intervention (the baseline), then alpha_sys over ``sweep_alpha_sys`` x the layer
sets ``sweep_layers`` (alpha_img fixed); ``out`` holds the table, plus ``<out stem>.md`` and ``.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_avar import atomic_files

__all__ = ["InterveneConfig", "run_intervene"]


@dataclass(frozen=True)
class InterveneConfig:
    """model / data: as `avar vas`. out: the JSON file to write. alpha_img, alpha_sys, mode, queries, edit_sink:
    see intervention.InterventionSpec. layers: a layer set ("middle" = layers 8-13 of 28, scaled). num_samples:
    first N records (None: all). max_new_tokens: generation budget. batch_size: prompts per generate call.
    sweep: run the grid; sweep_alpha_sys: its alpha_sys values; sweep_layers: its layer sets. overwrite: replace
    the results of an earlier run at ``out`` (refused otherwise, before the model loads)."""

    model: str
    data: str
    out: str
    alpha_img: float = 0.15
    alpha_sys: float = 0.05
    mode: str = "multiplicative"
    layers: str = "middle"
    queries: str = "user_text_and_response"
    edit_sink: bool = True
    num_samples: int | None = None
    max_new_tokens: int = 512
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    impl: str = "auto"
    sweep: bool = False
    sweep_alpha_sys: tuple[float, ...] = (0.0, 0.05, 0.4, 0.6)
    sweep_layers: tuple[str, ...] = ("middle", "all")
    overwrite: bool = False

    def __post_init__(self):
        # YAML gives lists: keep the frozen config hashable and its sweep order fixed
        object.__setattr__(self, "sweep_alpha_sys", tuple(float(a) for a in self.sweep_alpha_sys))
        object.__setattr__(self, "sweep_layers", tuple(dict.fromkeys(str(s) for s in self.sweep_layers)))
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or null (all), got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.sweep and (not self.sweep_alpha_sys or not self.sweep_layers):
            raise ValueError("a sweep needs at least one alpha_sys value and one layer set")


def _generate_and_grade(model, processor, samples, hook, spec, config, device) -> dict:
    """Accuracy and per-sample results of one setting (``spec`` None: no intervention)."""
    import torch

    from megatron_avar.analysis.batching import collate_prompts
    from megatron_avar.grading import INTERVENTION, grade
    from megatron_avar.models.hf_inference import cut_at_stop, decoding_config, pad_token_id, stop_token_ids

    tokenizer = processor.tokenizer
    pad_id = pad_token_id(tokenizer, model.generation_config)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    # greedy as `avar eval` decodes, not with the checkpoint's repetition penalty or sampling fields
    generation_config = decoding_config(max_new_tokens=config.max_new_tokens, pad_token_id=pad_id, stop_ids=stop_ids)
    results = []
    for start in range(0, len(samples), config.batch_size):
        batch = collate_prompts(samples[start:start + config.batch_size], pad_token_id=pad_id,
                                image_token_id=processor.image_token_id).to(device)
        hook.set_batch(batch.roles, intervention=spec)
        with torch.no_grad():
            sequences = model.generate(**batch.inputs, generation_config=generation_config)
        prompt_length = batch.inputs["input_ids"].shape[1]
        for row, (sample_id, truth) in enumerate(zip(batch.ids, batch.answers)):
            tokens = cut_at_stop(sequences[row, prompt_length:].tolist(), stop_ids)
            # Decode with special tokens: <answer> / </answer> are special tokens in AVAR tokenizers.
            text = tokenizer.decode(tokens, skip_special_tokens=False)
            entry = dict(id=sample_id, answer=truth, generated=text, num_tokens=len(tokens))
            if truth is not None:
                graded = grade(text, truth, INTERVENTION)
                entry["correct"], entry["extracted"] = graded.correct, graded.answer
            results.append(entry)
    graded = [r for r in results if "correct" in r]
    accuracy = sum(r["correct"] for r in graded) / len(graded) if graded else None
    return dict(accuracy=accuracy, num_graded=len(graded), num_samples=len(results), samples=results)


def run_intervene(config: InterveneConfig) -> dict:
    """Run (or sweep), write ``config.out`` (and the sweep's .md / .png); return what was written. Every setting
    is checked before the model loads. One run at a time per ``out`` (``training.run_lock``, on
    ``<out folder>/.avar-locks/<out name>``: runs writing other files of one folder do not wait): two would each
    write their results over the other's and both say they had written them."""
    from megatron_avar.analysis.intervention import InterventionSpec
    from megatron_avar.analysis.model_loading import check_hf_checkpoint, resolve_device
    from megatron_avar.models.layer_sets import parse_layers
    from megatron_avar.training.run_lock import holding_run_lock

    check_hf_checkpoint(config.model)
    resolve_device(config.device)
    model_config = json.loads((Path(config.model) / "config.json").read_text())  # (parsed by the check above)
    num_layers = int(model_config.get("text_config", model_config)["num_hidden_layers"])

    def spec(alpha_sys: float, layer_text: str) -> InterventionSpec:
        return InterventionSpec(alpha_img=config.alpha_img, alpha_sys=alpha_sys, mode=config.mode,
                                layers=parse_layers(layer_text, num_layers), queries=config.queries,
                                edit_sink=config.edit_sink)

    # Validate every setting before loading the model.
    settings = [(a, layer_text) for layer_text in config.sweep_layers for a in config.sweep_alpha_sys] \
        if config.sweep else [(config.alpha_sys, config.layers)]
    specs = [(layer_text, spec(a, layer_text)) for a, layer_text in settings]
    out = Path(config.out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out {out}: give a .json file path")
    sweep_outputs = [out.with_suffix(".md"), out.with_suffix(".png")]  # a single run's --out replaces them too
    _refuse_inputs_as_out(config, out)  # before the lock, whose folder would land beside --out
    _refuse_outputs(config, out, sweep_outputs)
    with holding_run_lock(out.parent / ".avar-locks" / out.name, conflict=(
            "two `avar intervene` runs writing one --out would replace each other's results. Wait for that run to "
            "end (or stop it), or give this one another --out")):
        # again, now that no other run can write them: one that held the lock may have finished since
        _refuse_outputs(config, out, sweep_outputs)
        return _run_locked(config, specs, num_layers, out, sweep_outputs)


def _refuse_inputs_as_out(config: InterveneConfig, out: Path) -> None:
    """ValueError when --out is what the run reads: the --data file, a file in a --data folder (each .json file
    there is read as records) or in the --model folder. (Found in review: --overwrite replaced the dataset.)"""
    target, data, model = out.resolve(), Path(config.data).resolve(), Path(config.model).resolve()
    if target == data:
        raise ValueError(f"--out {out} is the --data file: the results would replace the dataset; choose another "
                         "--out")
    if data in target.parents:
        raise ValueError(f"--out {out} lies in the --data folder {config.data}, whose .json files are read as records; "
                         "choose another --out")
    if model in target.parents:
        raise ValueError(f"--out {out} lies in the --model folder {config.model}: the results would go among the "
                         "model's files; choose another --out")


def _refuse_outputs(config: InterveneConfig, out: Path, sweep_outputs: list[Path]) -> None:
    """ValueError unless every file the run writes is missing or holds results of an earlier `avar intervene` run
    (replaced only with --overwrite): a file of anything else is never replaced, --overwrite or not."""
    from megatron_avar.analysis.run_vas import refuse_existing_outputs

    for path in (out, *sweep_outputs):
        held = _foreign_content(path)
        if held is not None:
            raise ValueError(f"{path} holds {held}, which `avar intervene --out {out}` would replace; it replaces "
                             "only its own results, --overwrite or not: choose another --out")
    refuse_existing_outputs([out, *sweep_outputs], overwrite=config.overwrite, what="intervention results")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _foreign_content(path: Path) -> str | None:
    """What the file ``path`` holds, in words, when that is not what `avar intervene` writes there: results JSON
    (recognised by its keys), a sweep table (by its first line) or a PNG figure. None for those, and when ``path``
    is no file (a folder is refused by refuse_existing_outputs)."""
    if not path.is_file():
        return None
    content = path.read_bytes()
    if path.suffix == ".png":
        return None if content.startswith(_PNG_SIGNATURE) else "a file that is not a PNG figure"
    if path.suffix == ".md":
        return None if content.startswith(_SWEEP_TITLE.encode()) else "text that is not a sweep table"
    try:
        data = json.loads(content)
    except ValueError:  # (a UnicodeDecodeError is one too)
        return "a file that is not JSON"
    if isinstance(data, dict):
        if {"config", "checkpoint", "num_model_layers"} <= data.keys() and ("intervention" in data or "rows" in data):
            return None
        if "model_type" in data or "architectures" in data:
            return "a model's config"
        if "vas_per_layer" in data:
            return "a VAS report"
        if "messages" in data:
            return "a conversation record"
    if isinstance(data, list):
        return "a list of records (a .json dataset)"
    return "JSON of another kind"


def _run_locked(config: InterveneConfig, specs: list, num_layers: int, out: Path, sweep_outputs: list[Path]) -> dict:
    """The body of :func:`run_intervene` once its settings are checked and ``out`` is locked."""
    from megatron_avar.analysis.batching import prompt_samples
    from megatron_avar.analysis.figures import plot_accuracy_vs_alpha, publish
    from megatron_avar.analysis.hf_attention import RoleAttentionHook
    from megatron_avar.analysis.model_loading import checkpoint_identity, load_hf_model

    started = time.time()
    model, processor, device = load_hf_model(config.model, device=config.device, dtype=config.dtype,
                                             device_map=config.device_map)
    samples = prompt_samples(config.data, processor, num_samples=config.num_samples)
    if all(s.answer is None for s in samples):
        raise ValueError(f"--data {config.data}: no record has an 'answer'; grading needs ground-truth answers")
    header = dict(config=asdict(config), checkpoint=checkpoint_identity(config.model), num_model_layers=num_layers)
    written: dict[str, Any]
    with RoleAttentionHook(model, impl=config.impl) as hook:
        if not config.sweep:
            layer_text, the_spec = specs[0]
            run = _generate_and_grade(model, processor, samples, hook, the_spec, config, device)
            written = dict(header, intervention=the_spec.to_json(), **run)
        else:
            baseline = _generate_and_grade(model, processor, samples, hook, None, config, device)
            rows = []
            for layer_text, the_spec in specs:
                run = _generate_and_grade(model, processor, samples, hook, the_spec, config, device)
                layer_indexes = None if the_spec.layers is None else list(the_spec.layers)  # None: all
                rows.append(dict(layers=layer_text, layer_indexes=layer_indexes, alpha_img=the_spec.alpha_img,
                                 alpha_sys=the_spec.alpha_sys, mode=the_spec.mode, accuracy=run["accuracy"],
                                 num_graded=run["num_graded"],
                                 correct=[s.get("correct") for s in run["samples"]]))
            written = dict(header, baseline=dict(accuracy=baseline["accuracy"], num_graded=baseline["num_graded"],
                                                 samples=baseline["samples"]), rows=rows)
    written["runtime"] = dict(seconds=round(time.time() - started, 2), device=device)
    table, figure = sweep_outputs
    # A single run removes an earlier sweep's table and figure: they would describe other results than --out's.
    companions: dict[Path, Callable[[Path], object] | None] = dict.fromkeys(sweep_outputs)
    if config.sweep:
        companions = {table: lambda path: path.write_text(_sweep_markdown(written), encoding="utf-8"),
                      figure: lambda path: plot_accuracy_vs_alpha(written["rows"], written["baseline"]["accuracy"],
                                                                  path)}
    publish(out, atomic_files.json_text(written), companions)  # --out last: never beside another run's table
    return written


_SWEEP_TITLE = "Intervention sweep on "  # the first line of every sweep table: how a rerun knows one


def _sweep_markdown(written: dict) -> str:
    base = written["baseline"]["accuracy"]
    lines = [f"{_SWEEP_TITLE}{written['checkpoint']['path']} "
             f"({written['baseline']['num_graded']} graded samples)",
             "", f"No intervention: accuracy {base:.4f}" if base is not None else "No intervention: no graded samples",
             "",
             "| layers | mode | alpha_img | alpha_sys | accuracy | delta vs none |", "|---|---|---|---|---|---|"]
    for row in written["rows"]:
        acc = row["accuracy"]
        delta = "-" if acc is None or base is None else f"{acc - base:+.4f}"
        lines.append(f"| {row['layers']} ({','.join(map(str, row['layer_indexes']))}) | {row['mode']} | "
                     f"{row['alpha_img']} | {row['alpha_sys']} | {'-' if acc is None else f'{acc:.4f}'} | {delta} |")
    return "\n".join(lines) + "\n"
