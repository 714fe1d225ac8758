"""The conversion work: HF safetensors -> megatron distributed checkpoint (one process per TP x PP rank, each
reading only the tensors of its own shard) and back (one process, the checkpoint resharded to TP=1, PP=1 on
load). The model is built by ``models.qwen2_5_vl.build`` (as in training); the ranks are started by the
package's launcher, ``megatron_avar.local_ranks.launch``. Under ``torchrun`` the same rank functions can be
called directly.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import torch

from megatron_avar import atomic_files
from megatron_avar.convert import hf_files
from megatron_avar.local_ranks import launch  # noqa: F401  (how cli.py and verify.py start the rank functions)
from megatron_avar.models import hf_weights

CHECKPOINT_INFO = "avar_checkpoint.json"
HF_SIDE_DIR = "hf"
# What a training checkpoint holds beside the model (`training.checkpointing` writes them): its trainer state and
# per-rank RNG states. A conversion never writes them, and never replaces a folder holding them (`hf_files`).
TRAINER_STATE = "trainer_state.json"
RANK_STATE = "rank_state"
LATEST = "latest"  # in a run's checkpoints/ folder: the name of its newest complete checkpoint
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}  # safetensors / avar_checkpoint.json names -> torch dtypes
# Files only a megatron checkpoint has at its top: ours, Megatron-LM's iteration tracker, torch_dist's metadata.
_MEGATRON_FILES = (CHECKPOINT_INFO, "latest_checkpointed_iteration.txt", ".metadata")


def checkpoint_dtype(hf_dir: Path) -> torch.dtype:
    """The one floating dtype of an HF checkpoint's tensors (float32 or bfloat16); ValueError otherwise."""
    dtypes = {dtype for _, dtype in hf_weights.tensor_names_and_shapes(hf_dir).values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise ValueError(f"{hf_dir}: tensors are {sorted(dtypes)}; supported: all F32 or all BF16")
    return DTYPES[next(iter(dtypes))]


def check_hf_names(hf_dir: Path, config) -> int:
    """Every HF tensor name is one the config expects and none is missing; returns the number of tensors."""
    from megatron_avar.models.qwen2_5_vl.hf_mapping import canonical_hf_name, param_mappings

    present = {canonical_hf_name(n) for n in hf_weights.tensor_names_and_shapes(hf_dir)}
    if config.text.tie_word_embeddings:
        present.discard("lm_head.weight")
    expected = {name for m in param_mappings(config) for name in m.hf}
    unexpected, missing = sorted(present - expected), sorted(expected - present)
    if unexpected:
        raise ValueError(f"{hf_dir}: tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) is not part of a "
                         "Qwen2.5-VL model with this config.json")
    if missing:
        raise ValueError(f"{hf_dir}: tensor {missing[0]!r} (and {len(missing) - 1} more) is missing")
    return len(present)


def hf_to_mcore_rank(hf_dir: str, out_dir: str, tp: int, pp: int, dtype: torch.dtype, num_tensors: int) -> None:
    """One rank: build its shard of the model, fill it from the HF shards, save collectively (torch_dist)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from tqdm import tqdm

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import build_stage, init_model_parallel

    config = Qwen25VLConfig.from_hf(hf_dir)
    try:
        init_model_parallel(tp, pp, seed=0)
        tensors = hf_weights.iter_lazy_tensors(Path(hf_dir))
        if dist.get_rank() == 0:
            tensors = tqdm(tensors, total=num_tensors, desc="reading HF tensors (rank 0)", unit="tensor")
        model = build_stage(config, tp=tp, pp=pp, dtype=dtype, hf_tensors=tensors)
        assert {p.dtype for p in model.parameters()} == {dtype}, "conversion would round"
        with hf_files.explaining_write_failures(Path(out_dir)):
            dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    finally:
        parallel_state.destroy_model_parallel()


def mcore_to_hf_rank(mcore_dir: str, out_dir: str, max_shard_bytes: int, hf_layout: str = "published") -> None:
    """One process: load the checkpoint resharded to TP=1, PP=1 and write HF safetensors, shard by shard, with
    tensor names in ``hf_layout`` (``hf_mapping.HF_LAYOUTS``; "published": the Hub checkpoints' names) and every
    tensor in the checkpoint's dtype (``avar_checkpoint.json``), as in the published checkpoints: norms that
    megatron keeps in float32 in a bfloat16 model are written in bfloat16 too."""
    from megatron.core import parallel_state
    from tqdm import tqdm

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import build_stage, init_model_parallel
    from megatron_avar.models.qwen2_5_vl.hf_mapping import hf_name_in_layout, iter_hf_tensors, param_mappings

    folder = Path(mcore_dir)
    info = read_checkpoint_info(folder)
    config = Qwen25VLConfig.from_hf(str(folder / HF_SIDE_DIR))
    try:
        dtype = DTYPES[info["dtype"]]
        init_model_parallel(1, 1, seed=0)
        model = build_stage(config, tp=1, pp=1, dtype=dtype)
        load_model_weights(model, folder)
        hf_files.check_free_space(Path(out_dir), sum(p.numel() * dtype.itemsize for p in model.parameters()))
        total = sum(len(m.hf) for m in param_mappings(config))
        with tqdm(total=total, desc="writing HF tensors", unit="tensor") as progress, \
                hf_files.explaining_write_failures(Path(out_dir)):
            tensors = ((hf_name_in_layout(name, hf_layout), tensor.to(dtype))
                       for name, tensor in iter_hf_tensors(model, config))
            hf_files.write_sharded_safetensors(tensors, Path(out_dir), max_shard_bytes=max_shard_bytes,
                                               progress=progress)
    finally:
        parallel_state.destroy_model_parallel()


def load_model_weights(model, mcore_dir: Path) -> None:
    """Fill ``model`` (any TP/PP layout) from a megatron checkpoint written by `avar convert` or by training
    (whose optimizer states are skipped); ValueError when the model's tensors and the checkpoint's differ."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException (a shape mismatch)

    from megatron_avar.checkpoint_matching import load_module_state, without_extra_states
    from megatron_avar.checkpoint_vetting import vet_dist_checkpoint

    vet_dist_checkpoint(Path(mcore_dir))  # megatron unpickles parts of it: refuse anything but plain data first
    try:
        # RETURN_ALL: megatron returns (state, missing keys, unexpected keys); its annotation is a union
        state, missing, unexpected = typing.cast(
            tuple[dict, set[str], set[str]],
            dist_checkpointing.load(model.sharded_state_dict(), str(mcore_dir), strict=StrictHandling.RETURN_ALL))
    except (CheckpointingException, CheckpointException) as error:
        raise ValueError(f"{mcore_dir} does not match the model of its hf/config.json: {_first_cause(error)}") from None
    # Keys on one side only, optimizer states and Transformer Engine's extra states aside (megatron's names for the
    # two sides vary by version; checkpoint_matching: a checkpoint written with TE loads without it).
    missing, unexpected = ([k for k in without_extra_states(keys) if not k.startswith("optimizer.")]
                           for keys in (missing, unexpected))
    if missing or unexpected:
        raise ValueError(f"{mcore_dir} does not match the model of its hf/config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    load_module_state(model, {k: v for k, v in state.items() if k != "optimizer"}, source=Path(mcore_dir))


def _first_cause(error: BaseException) -> str:
    """The message of a checkpoint load failure without the per-rank tracebacks torch's CheckpointException
    carries (``failures``: rank -> (exception, stack))."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        cause = cause[0] if isinstance(cause, tuple) else cause
        return f"{type(cause).__name__}: {cause}"
    return str(error)


def not_a_checkpoint_hint(path: str | Path, *, hf_only: bool = False) -> str | None:
    """What ``path``, given where one checkpoint belongs, is instead, with the fix: a training run's folder, or
    its checkpoints folder (found in review: both were called "not a checkpoint written by `avar convert`", or a
    model with model_type None). ``hf_only``: the command reads Hugging Face folders only, so the fix is an export.
    None for anything else."""
    path = Path(path)
    for pointer, what in ((path / "checkpoints" / LATEST, "a training run's folder"),
                          (path / LATEST, "a training run's checkpoints folder")):
        if pointer.is_file():
            try:
                newest = pointer.parent / pointer.read_text().strip()
            except (OSError, UnicodeDecodeError):
                newest = pointer.parent / "step_..."
            if hf_only:
                export = export_hint(newest, its="its newest checkpoint")
                return f"{path} is {what}, not a Hugging Face model folder: {export}"
            return f"{path} is {what}, not a checkpoint: give one of its checkpoints, e.g. the newest, {newest}"
    return None


def is_megatron_checkpoint(path: str | Path) -> bool:
    """Whether the folder ``path`` is a megatron checkpoint rather than a Hugging Face model folder: one of ours
    (``avar_checkpoint.json``) or one Megatron-LM wrote (its iteration tracker, torch_dist's ``.metadata``, or
    ``iter_*`` folders). The one test every command that takes a model folder uses to tell the two apart."""
    path = Path(path)
    return path.is_dir() and (any((path / name).is_file() for name in _MEGATRON_FILES)
                              or any(child.is_dir() for child in path.glob("iter_*")))


def export_hint(path: str | Path, *, its: str = "") -> str:
    """The fix for a megatron checkpoint ``path`` given where a Hugging Face model folder belongs (``its``: how to
    name it when it is not what was given). One megatron_avar did not write cannot be exported by it."""
    if not its and not (Path(path) / CHECKPOINT_INFO).is_file():
        return _foreign_hint(path)
    named = f"export {its}" if its else f"{path} is a megatron checkpoint: export it"
    return f"{named} (avar convert mcore-to-hf --mcore-path {path} --out DIR) and give DIR"


def _foreign_hint(path: str | Path) -> str:
    return (f"{path} is a Megatron-LM checkpoint that megatron_avar did not write (it has no {CHECKPOINT_INFO}, "
            "which names the model and layout it holds): give the Hugging Face model it came from (avar convert "
            "hf-to-mcore makes a megatron checkpoint of it when one is needed)")


def read_checkpoint_info(mcore_dir: Path) -> dict:
    """The checkpoint's description; ValueError when the folder is missing, is not a checkpoint written by
    `avar convert` or training, or lacks its HF config (the model it holds)."""
    if not Path(mcore_dir).is_dir():
        raise ValueError(f"{mcore_dir} {'is a file' if Path(mcore_dir).exists() else 'does not exist'}: give a "
                         "megatron checkpoint folder (`avar convert hf-to-mcore` output, or a training run's "
                         "checkpoints/step_N)")
    path = Path(mcore_dir) / CHECKPOINT_INFO
    if not path.is_file():
        raise ValueError(not_a_checkpoint_hint(mcore_dir) or
                         (_foreign_hint(mcore_dir) if is_megatron_checkpoint(mcore_dir) else None) or
                         f"{mcore_dir} has no {CHECKPOINT_INFO}: not a megatron checkpoint (`avar convert "
                         "hf-to-mcore` output, or a training run's checkpoints/step_00000007)")
    try:
        info = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the checkpoint's description is damaged") from None
    if not isinstance(info, dict) or info.get("format") != "torch_dist" or info.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: unsupported checkpoint description {info}")
    if not (Path(mcore_dir) / HF_SIDE_DIR / "config.json").is_file():
        raise ValueError(f"{mcore_dir} lacks {HF_SIDE_DIR}/config.json (the HF config every checkpoint carries, with "
                         "the tokenizer and processor files of the model it came from): not a complete checkpoint")
    return info


def write_checkpoint_info(mcore_dir: Path, *, tp: int, pp: int, dtype: torch.dtype, source: str) -> None:
    name = {v: k for k, v in DTYPES.items()}[dtype]
    info = {"format": "torch_dist", "model": "qwen2_5_vl", "dtype": name, "written_at_tp": tp, "written_at_pp": pp,
            "source": source}
    atomic_files.write_json(Path(mcore_dir) / CHECKPOINT_INFO, info)
