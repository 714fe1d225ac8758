"""The conversion work: HF safetensors -> megatron distributed checkpoint (one process per TP x PP rank, each
reading only the tensors of its own shard) and back (one process, the checkpoint resharded to TP=1, PP=1 on
load), plus the local launcher that starts those processes.

Ranks are started with ``torch.multiprocessing`` (spawn, non-daemonic: megatron's torch_dist writer starts
helper processes of its own). Under ``torchrun`` the same rank functions can be called directly.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from megatron_avar.convert import hf_files

CHECKPOINT_INFO = "avar_checkpoint.json"
HF_SIDE_DIR = "hf"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}


def checkpoint_dtype(hf_dir: Path) -> torch.dtype:
    """The one floating dtype of an HF checkpoint's tensors (float32 or bfloat16); ValueError otherwise."""
    dtypes = {dtype for _, dtype in hf_files.tensor_names_and_shapes(hf_dir).values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise ValueError(f"{hf_dir}: tensors are {sorted(dtypes)}; supported: all F32 or all BF16")
    return _DTYPES[next(iter(dtypes))]


def check_hf_names(hf_dir: Path, config) -> int:
    """Every HF tensor name is one the config expects and none is missing; returns the number of tensors."""
    from megatron_avar.models.qwen2_5_vl.hf_mapping import canonical_hf_name, param_mappings

    present = {canonical_hf_name(n) for n in hf_files.tensor_names_and_shapes(hf_dir)}
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


def launch(fn, world_size: int, *args) -> None:
    """Run ``fn(*args)`` on ``world_size`` local ranks with torch.distributed (and megatron) initialised.
    A ValueError raised by a rank is raised here as ValueError with the rank's message."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        mp.start_processes(_rank_entry, args=(world_size, port, fn, args), nprocs=world_size, start_method="spawn")
    except mp.ProcessRaisedException as error:
        last = str(error).strip().splitlines()[-1]
        if last.startswith("ValueError: "):
            raise ValueError(last[len("ValueError: "):]) from None
        raise


def _rank_entry(rank: int, world_size: int, port: int, fn, args) -> None:
    import torch.distributed as dist

    from megatron_avar import platform

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    platform.bind_device(rank)
    dist.init_process_group(platform.distributed_backend(), rank=rank, world_size=world_size)
    try:
        platform.prepare_megatron()
        fn(*args)
    finally:
        dist.destroy_process_group()


def _build_model(config, tp: int, pp: int, dtype: torch.dtype, *, role_mass_layers=()):
    """This rank's stage of the model (no DDP) after initialising megatron's parallel state at TP x PP;
    ``role_mass_layers``: decoder layers built as AVAR layers (per-role masses, for `avar vas`)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar.models.qwen2_5_vl import MegatronSettings
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(0)
    settings = MegatronSettings(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=dtype,
                                perform_initialization=False)
    return Qwen25VLModel(config, settings, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                         pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage(), role_mass_layers=role_mass_layers)


def hf_to_mcore_rank(hf_dir: str, out_dir: str, tp: int, pp: int, dtype: torch.dtype, num_tensors: int) -> None:
    """One rank: build its shard of the model, fill it from the HF shards, save collectively (torch_dist)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from tqdm import tqdm

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.hf_mapping import load_hf_tensors

    config = Qwen25VLConfig.from_hf(hf_dir)
    try:
        model = _build_model(config, tp, pp, dtype)
        # Megatron's local (non-Transformer-Engine) norms keep float32 parameters in a bfloat16 model: they take
        # the checkpoint's bfloat16 values exactly (export casts them back). Nothing else may differ: no rounding.
        assert {p.dtype for p in model.parameters()} <= {dtype, torch.float32}, "conversion would round"
        tensors = hf_files.iter_lazy_tensors(Path(hf_dir))
        if dist.get_rank() == 0:
            tensors = tqdm(tensors, total=num_tensors, desc="reading HF tensors (rank 0)", unit="tensor")
        load_hf_tensors(model, tensors, config, cast_to_model_dtype=True)
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
    from megatron_avar.models.qwen2_5_vl.hf_mapping import hf_name_in_layout, iter_hf_tensors, param_mappings

    mcore_dir = Path(mcore_dir)
    info = read_checkpoint_info(mcore_dir)
    config = Qwen25VLConfig.from_hf(str(mcore_dir / HF_SIDE_DIR))
    try:
        dtype = _DTYPES[info["dtype"]]
        model = _build_model(config, 1, 1, dtype)
        load_model_weights(model, mcore_dir)
        total = sum(len(m.hf) for m in param_mappings(config))
        with tqdm(total=total, desc="writing HF tensors", unit="tensor") as progress:
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

    from megatron_avar.checkpoint_vetting import vet_dist_checkpoint

    vet_dist_checkpoint(Path(mcore_dir))  # megatron unpickles parts of it: refuse anything but plain data first
    try:
        state, missing, unexpected = dist_checkpointing.load(model.sharded_state_dict(), str(mcore_dir),
                                                             strict=StrictHandling.RETURN_ALL)
    except CheckpointingException as error:
        raise ValueError(f"{mcore_dir} does not match the model of its hf/config.json: {error}") from None
    # Keys on one side only, optimizer states aside (megatron's names for the two sides vary by version).
    missing, unexpected = ([k for k in sorted(keys) if not k.startswith("optimizer.")] for keys in (missing, unexpected))
    if missing or unexpected:
        raise ValueError(f"{mcore_dir} does not match the model of its hf/config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k != "optimizer"})


def read_checkpoint_info(mcore_dir: Path) -> dict:
    path = Path(mcore_dir) / CHECKPOINT_INFO
    if not path.is_file():
        raise ValueError(f"{mcore_dir} has no {CHECKPOINT_INFO}: not a checkpoint written by `avar convert`")
    info = json.loads(path.read_text())
    if info.get("format") != "torch_dist" or info.get("dtype") not in _DTYPES:
        raise ValueError(f"{path}: unsupported checkpoint description {info}")
    return info


def write_checkpoint_info(mcore_dir: Path, *, tp: int, pp: int, dtype: torch.dtype, source: str) -> None:
    name = {v: k for k, v in _DTYPES.items()}[dtype]
    info = {"format": "torch_dist", "model": "qwen2_5_vl", "dtype": name, "written_at_tp": tp, "written_at_pp": pp,
            "source": source}
    (Path(mcore_dir) / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")
