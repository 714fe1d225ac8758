"""`avar vas`: the Visual Attention Score of an HF Qwen2.5-VL checkpoint on a conversation dataset.

Prompt-only prefill (final assistant turn dropped, generation prompt added), batched with left padding; the
text attention runs through `RoleAttentionHook` (no [S, S] matrix: plain attention for the output, the probe
for the masses of the VAS query rows), masses stream into a VASAccumulator.
The loop is source-agnostic (``accumulate_vas`` + ``write_vas_report``): a megatron model that returns
per-layer role masses plugs in through the same two calls. Output folder: report.json (every number of vas.py,
both sink variants, the config, the checkpoint identity) and vas_per_layer.png, image_share_heatmap.png,
ratio_distribution.png.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_avar import atomic_files

__all__ = ["VASConfig", "run_vas", "accumulate_vas", "accumulate_hf_vas", "write_vas_report", "merge_vas_reports",
           "refuse_existing_outputs", "VAS_FIGURES"]

VAS_FIGURES = ("vas_per_layer.png", "image_share_heatmap.png", "ratio_distribution.png")  # beside report.json


@dataclass(frozen=True)
class VASConfig:
    """model: HF checkpoint directory. data: conversation file/folder. out: output folder (created).
    num_samples: first N records. layers: "all", "A-B" or "i,j". exclude_sink: top-level numbers without the
    sink in K_sys (both variants are always in report.json). batch_size: prompts per forward.
    device / dtype / device_map: see model_loading.load_hf_model. impl: role_attention implementation.
    name: the checkpoint's label in `avar vas compare` (default: the model folder's name). shard: "I/N" takes
    records I, I + N, ... of the first num_samples (one job per GPU; `avar vas merge` joins the reports).
    overwrite: replace the report of an earlier run in ``out`` (refused otherwise, before anything runs)."""

    model: str
    data: str
    out: str
    num_samples: int = 200
    layers: str = "all"
    exclude_sink: bool = False
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    impl: str = "auto"
    name: str | None = None
    shard: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.shard is not None:
            index, _, count = self.shard.partition("/")
            if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
                raise ValueError(f"shard={self.shard!r}: use I/N with 0 <= I < N (this job takes records I, I+N, ...)")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def shard_index(self) -> tuple[int, int] | None:
        """(I, N) of ``shard``, or None."""
        if self.shard is None:
            return None
        index, _, count = self.shard.partition("/")
        return int(index), int(count)


def refuse_existing_outputs(paths: Sequence[str | Path], *, overwrite: bool, what: str,
                            also_writes: Sequence[str | Path] = ()) -> None:
    """A second run never replaces an earlier run's results unasked: ValueError naming the first of ``paths`` that
    exists (``what`` it holds) and the fix, unless ``overwrite``. ``also_writes``: files the run replaces whatever
    they hold (a report's figures). Refused whatever ``overwrite`` says: a folder among these files (a run replaces
    files, never a folder, and would fail only after its work), or a file where their folder should be. Called
    before any work starts."""
    files = [Path(p) for p in [*paths, *also_writes]]
    for folder in dict.fromkeys(file.parent for file in files):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {folder} is a file; give a folder for the results")
    for file in files:
        if file.is_dir():
            raise ValueError(f"{file} is a folder, where this run writes a file; move the folder away or choose "
                             "another --out")
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} holds {what} from an earlier run; pass --overwrite to replace it, or choose "
                         "another --out")


def refuse_foreign_report(out: str | Path) -> None:
    """ValueError when ``out/report.json`` exists and is not a VAS report: `avar vas` and `avar vas merge` replace
    only a report of their own, --overwrite or not (found in review: any report.json was replaced)."""
    from megatron_avar.analysis.compare import load_report

    file = Path(out) / "report.json"
    if not file.is_file():
        return  # (missing, or a folder: refuse_existing_outputs names that)
    try:
        load_report(file, shard_without_samples=True)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{file} is not a VAS report, and `avar vas` replaces only its own report, --overwrite or "
                         "not; choose another --out") from None


# What the shards of one `avar vas` run share (besides the checkpoint); batch size and device may differ.
_SHARD_RUN_KEYS = ("data", "num_samples", "layers", "dtype", "impl")  # compared as compare.run_setting resolves them


def _same_weights(report: dict, other: dict) -> bool:
    """Whether two reports were computed on the same weights: by content (`model_loading.weights_differ`), wherever
    each shard job read them from; reports from before content hashes by their records without what a copy or a
    touch changes (shard modification times)."""
    from megatron_avar.analysis.model_loading import weights_differ

    a, b = report["checkpoint"], other["checkpoint"]
    if "weights_sha256" in a and "weights_sha256" in b:
        return weights_differ(a, b) is None
    strip = lambda checkpoint: {**checkpoint, "shards": [(s["name"], s["bytes"])  # noqa: E731
                                                         for s in checkpoint.get("shards", [])]}
    return strip(a) == strip(b)


def _check_shard_set(paths: Sequence[str], reports: list[dict]) -> None:
    """ValueError unless the reports are exactly the shards 0/N .. N-1/N of one run (each once)."""
    shards = [report["config"].get("shard") for report in reports]
    if any(shard is None for shard in shards):
        raise ValueError(f"{paths[shards.index(None)]} is not a shard (`avar vas --shard I/N`); merge only shard "
                         "reports")
    counts = {int(shard.partition("/")[2]) for shard in shards}
    indexes = sorted(int(shard.partition("/")[0]) for shard in shards)
    if len(counts) != 1 or indexes != list(range(next(iter(counts)))):
        raise ValueError(f"the reports are shards {sorted(shards)}: a merge needs each of 0/N .. N-1/N exactly once "
                         "(a missing shard would leave its samples out of the merged report)")


def merge_vas_reports(paths: Sequence[str], out: str | Path, *, exclude_sink: bool | None = None,
                      overwrite: bool = False) -> dict:
    """Join the reports of `avar vas --shard I/N` jobs (same checkpoint and settings) into one report in ``out``
    (an earlier report there is replaced only with ``overwrite``)."""
    from megatron_avar.analysis.compare import load_report, run_setting
    from megatron_avar.analysis.vas import VASAccumulator

    target = (Path(out) / "report.json").resolve()
    for path in paths:  # (found in review: --out vs0 --overwrite replaced shard vs0's own report)
        if (Path(path) / "report.json" if Path(path).is_dir() else Path(path)).resolve() == target:
            raise ValueError(f"--out {out} holds {path}, one of the reports being merged: the merge would replace "
                             "it; give another --out")
    refuse_foreign_report(out)
    refuse_existing_outputs([Path(out) / "report.json"], overwrite=overwrite, what="a VAS report",
                            also_writes=[Path(out) / name for name in VAS_FIGURES])
    reports = [load_report(p, shard_without_samples=True)[1] for p in paths]
    for path, report in zip(paths, reports):
        if "accumulator_state" not in report:
            raise ValueError(f"{path}: the report has no accumulator_state (written by an older avar vas); rerun it")
        if not _same_weights(report, reports[0]):
            raise ValueError(f"{path} comes from another checkpoint than {paths[0]} (checkpoint records differ); merge "
                             "shards of one run only")
        differ = [key for key in _SHARD_RUN_KEYS
                  if run_setting(report["config"], key) != run_setting(reports[0]["config"], key)]
        if differ:
            raise ValueError(f"{path} was run with other {', '.join(differ)} than {paths[0]}; merge shards of one run "
                             "only")
    _check_shard_set(paths, reports)
    accumulator = VASAccumulator.merge([r["accumulator_state"] for r in reports])
    first = reports[0]
    config = dict(first["config"], shard=None, merged_from=[str(p) for p in paths])
    runtime = dict(seconds=sum(r["runtime"]["seconds"] for r in reports), shards=[r["runtime"] for r in reports])
    return write_vas_report(accumulator, out,
                            exclude_sink=first["exclude_sink"] if exclude_sink is None else exclude_sink,
                            name=first["name"], config=config, checkpoint=first["checkpoint"], runtime=runtime)


def run_vas(config: VASConfig) -> dict:
    """Compute the report, write report.json and the figures into ``config.out``; return the report. One run at a
    time per ``out`` (``training.run_lock``): two (shards given one --out) would each write the report over the
    other's and both say they had written it."""
    from megatron_avar.training.run_lock import holding_run_lock

    out = Path(config.out)
    refuse_foreign_report(out)
    refuse_existing_outputs([out / "report.json"], overwrite=config.overwrite, what="a VAS report",
                            also_writes=[out / name for name in VAS_FIGURES])
    with holding_run_lock(out, conflict=(
            "two `avar vas` runs writing one --out would replace each other's report. Give each shard its own "
            "--out (`avar vas merge` combines them), or wait for that run to end")):
        return _run_vas(config)


def _run_vas(config: VASConfig) -> dict:
    import torch

    from megatron_avar.analysis.batching import collate_prompts, prompt_samples
    from megatron_avar.analysis.megatron_vas import run_vas_megatron
    from megatron_avar.analysis.model_loading import check_hf_checkpoint, checkpoint_identity, load_hf_model
    from megatron_avar.convert.checkpoint import is_megatron_checkpoint, not_a_checkpoint_hint
    from megatron_avar.models.hf_inference import pad_token_id
    from megatron_avar.models.layer_sets import parse_layers

    hint = not_a_checkpoint_hint(config.model)  # (avar vas reads megatron checkpoints too: no export needed)
    if hint is not None:
        raise ValueError(f"--model {hint}")
    if is_megatron_checkpoint(config.model):
        return run_vas_megatron(config)
    check_hf_checkpoint(config.model)
    text_config = json.loads((Path(config.model) / "config.json").read_text())
    num_layers = int(text_config.get("text_config", text_config)["num_hidden_layers"])
    layers = parse_layers(config.layers, num_layers)  # fail on a bad layer set before loading anything

    started = time.time()
    model, processor, device = load_hf_model(config.model, device=config.device, dtype=config.dtype,
                                             device_map=config.device_map)
    samples = prompt_samples(config.data, processor, num_samples=config.num_samples, shard=config.shard_index)
    pad_id = pad_token_id(processor.tokenizer, model.generation_config)
    batches = (collate_prompts(samples[start:start + config.batch_size], pad_token_id=pad_id,
                               image_token_id=processor.image_token_id).to(device)
               for start in range(0, len(samples), config.batch_size))
    accumulator = accumulate_hf_vas(model, batches, layers, impl=config.impl)
    runtime = dict(seconds=round(time.time() - started, 2), device=device, torch=torch.__version__,
                   num_records_rendered=len(samples))
    return write_vas_report(accumulator, config.out, exclude_sink=config.exclude_sink,
                            name=config.name or Path(config.model).resolve().name,
                            config=dict(asdict(config), layers_resolved=list(layers), num_model_layers=num_layers),
                            checkpoint=checkpoint_identity(config.model), runtime=runtime)


def accumulate_hf_vas(model, batches: Iterable, layers: Sequence[int], *, impl: str = "auto"):
    """:func:`accumulate_vas` for an HF Qwen2.5-VL model: a prompt-only prefill of each PromptBatch through
    `RoleAttentionHook`, whose text layers take ``out`` from the plain attention and probe the VAS query rows."""
    import torch

    from megatron_avar.analysis.hf_attention import RoleAttentionHook
    from megatron_avar.analysis.vas import vas_query_rows

    with RoleAttentionHook(model, impl=impl) as hook, torch.no_grad():
        def forward(batch, on_mass):
            hook.set_batch(batch.roles, on_mass=on_mass, mass_layers=layers, mass_rows=vas_query_rows(batch.roles))
            model(**batch.inputs, logits_to_keep=1)

        return accumulate_vas(batches, forward, layers, model.config.text_config.num_attention_heads)


def accumulate_vas(batches: Iterable, forward: Callable, layers: Sequence[int], num_heads: int):
    """The VASAccumulator (``.result()``: the statistics) over ``batches`` (PromptBatch-like: ``.roles`` [B, S],
    ``.ids``) for any attention source.

    ``forward(batch, on_mass)`` runs the model on one batch (prompt-only prefill) and calls
    ``on_mass(layer, mass)`` once per layer in ``layers`` with mass float [B, H, S, R] over all H heads, or
    [N, H, R] at the rows of ``vas.vas_query_rows(batch.roles)`` (R = MASS_NUM_ROLES with key roles
    ``vas.mass_key_roles(batch.roles)``, or 5 without a sink role).
    """
    from megatron_avar.analysis.vas import VASAccumulator

    accumulator = VASAccumulator(layers, num_heads)
    for batch in batches:
        accumulator.begin_batch(batch.roles, batch.ids)
        forward(batch, accumulator.add_layer)
        accumulator.end_batch()
    return accumulator


def write_vas_report(accumulator, out: str | Path, *, exclude_sink: bool, name: str, config: dict, checkpoint: dict,
                     runtime: dict) -> dict:
    """Write ``out``/report.json (the statistics, name, config, checkpoint, runtime and the accumulator state that
    `avar vas merge` combines across data shards) and the three figures (figures.publish: the report last, never
    beside an earlier run's figures); return the report. The config gets ``data_resolved``, the absolute data
    path."""
    from megatron_avar.analysis import figures

    out = Path(out)
    if config.get("data") is not None and "data_resolved" not in config:
        config = dict(config, data_resolved=str(Path(config["data"]).resolve()))
    if not accumulator.sample_ids and config.get("shard"):
        # A shard whose records hold no VAS query (text-only ones) still writes its state: `avar vas merge` needs
        # every shard, and the merged report counts these samples as skipped. No figures: an earlier run's are removed.
        report = dict(vas=None, num_samples=0, skipped_sample_ids=list(accumulator.skipped), name=name,
                      config=config, checkpoint=checkpoint, runtime=runtime, accumulator_state=accumulator.state_dict())
        figures.publish(out / "report.json", atomic_files.json_text(report),
                        dict.fromkeys(out / figure for figure in VAS_FIGURES))
        print(f"shard {config['shard']}: no sample has VAS queries ({len(accumulator.skipped)} skipped); its state "
              f"is in {out / 'report.json'} for `avar vas merge`", flush=True)
        return report
    report = accumulator.result().to_json(exclude_sink=exclude_sink)
    report.update(name=name, config=config, checkpoint=checkpoint, runtime=runtime,
                  accumulator_state=accumulator.state_dict())
    draws = (figures.plot_vas_per_layer, figures.plot_image_share_heatmap, figures.plot_ratio_distribution)
    figures.publish(out / "report.json", atomic_files.json_text(report),
                    {out / figure: functools.partial(draw, report) for figure, draw in zip(VAS_FIGURES, draws)})
    return report
