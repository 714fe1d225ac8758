"""`avar convert hf-to-mcore | mcore-to-hf | verify`: Qwen2.5-VL checkpoints between HF and megatron."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The choices of --hf-layout, spelled here so that `avar --help` does not import torch; equal to
# hf_mapping.HF_LAYOUTS (tested).
HF_LAYOUTS = ("published", "transformers5")
OVERWRITE_HELP = ("replace an existing --out that holds a model (an HF model folder, or a checkpoint hf-to-mcore "
                  "wrote) or nothing; any other folder is refused")


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert Qwen2.5-VL checkpoints between HF and megatron")
    commands = parser.add_subparsers(title="convert commands", dest="convert_command", metavar="COMMAND")
    formatter = argparse.ArgumentDefaultsHelpFormatter

    to_mcore = commands.add_parser("hf-to-mcore", formatter_class=formatter,
                                   help="HF safetensors -> megatron distributed checkpoint (torch_dist)")
    to_mcore.add_argument("--hf-path", required=True, type=Path, help="HF model folder (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the writing ranks")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the writing ranks")
    to_mcore.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    to_mcore.set_defaults(handler=_hf_to_mcore)

    to_hf = commands.add_parser("mcore-to-hf", formatter_class=formatter,
                                help="megatron checkpoint written by hf-to-mcore -> HF safetensors folder")
    to_hf.add_argument("--mcore-path", required=True, type=Path, help="megatron checkpoint folder")
    to_hf.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    to_hf.add_argument("--max-shard-size-mb", type=float, default=5000.0, help="largest safetensors file")
    to_hf.add_argument("--hf-layout", choices=HF_LAYOUTS, default="published",
                       help="tensor names: 'published' = those of every Qwen2.5-VL checkpoint on the Hub and of "
                            "save_pretrained (model.embed_tokens, model.layers.*, model.norm, visual.*, lm_head; "
                            "loads in transformers 4.x and 5.x alike); 'transformers5' = transformers >= 4.52's "
                            "module names (model.language_model.*, model.visual.*, lm_head), which transformers 5 "
                            "loads too")
    to_hf.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    to_hf.set_defaults(handler=_mcore_to_hf)
    check = commands.add_parser("verify", formatter_class=formatter,
                                help="same batch (text + an image) through HF and the converted model: compare logits")
    check.add_argument("--hf-path", required=True, type=Path, help="HF model folder")
    check.add_argument("--mcore-path", required=True, type=Path, help="megatron checkpoint folder")
    check.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    check.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is loaded at")
    check.add_argument("--max-abs-diff", type=float, default=1e-3,
                       help="fail (exit 1) when the largest absolute logit difference exceeds this")
    check.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="both models run in this dtype: float32 compares the conversion alone (bf16 weights "
                            "upcast exactly); bfloat16 halves the memory but adds two implementations' bf16 "
                            "rounding (~5e-2 in logits): raise --max-abs-diff with it")
    check.set_defaults(handler=_verify)
    parser.set_defaults(handler=None)


def _hf_to_mcore(args) -> int:
    from megatron_avar.convert import checkpoint, hf_files
    from megatron_avar.models.hf_weights import safetensors_files
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig

    inputs = {"--hf-path": args.hf_path}
    hf_files.check_output_apart(args.out, inputs)  # first: before anything is read, created or replaced
    if args.tp < 1 or args.pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got {args.tp} and {args.pp}")
    hf_dir = args.hf_path.absolute()
    safetensors_files(hf_dir)  # a model folder with its weights (not a file, not a weightless folder)
    config = Qwen25VLConfig.from_hf(str(hf_dir))  # refuses configs the model does not reproduce
    config.check_layout(tp=args.tp, pp=args.pp)
    num_tensors = checkpoint.check_hf_names(hf_dir, config)
    dtype = checkpoint.checkpoint_dtype(hf_dir)
    with hf_files.atomic_output_dir(args.out, overwrite=args.overwrite, inputs=inputs) as temp:
        hf_files.check_free_space(temp, sum(file.stat().st_size for file in safetensors_files(hf_dir)))
        checkpoint.launch(checkpoint.hf_to_mcore_rank, args.tp * args.pp, str(hf_dir), str(temp), args.tp, args.pp,
                          dtype, num_tensors)
        with hf_files.explaining_write_failures(temp):
            hf_files.copy_side_files(hf_dir, temp / checkpoint.HF_SIDE_DIR)
            checkpoint.write_checkpoint_info(temp, tp=args.tp, pp=args.pp, dtype=dtype, source=str(hf_dir))
    print(f"wrote megatron checkpoint (torch_dist, TP={args.tp} PP={args.pp}, {dtype}) to {args.out}")
    from megatron_avar.processor import missing_processor_files

    absent = missing_processor_files(hf_dir)
    if absent:
        print(f"warning: {hf_dir} has no {' and no '.join(absent)}: the checkpoint carries none, so training from it "
              "needs data.processor_path, and `avar vas` on it and its export to HF lack them too", file=sys.stderr)
    return 0


def _mcore_to_hf(args) -> int:
    from megatron_avar.convert import checkpoint, hf_files

    inputs = {"--mcore-path": args.mcore_path}
    hf_files.check_output_apart(args.out, inputs)  # first: before anything is read, created or replaced
    mcore_dir = args.mcore_path.absolute()
    info = checkpoint.read_checkpoint_info(mcore_dir)
    if not 0 < args.max_shard_size_mb < float("inf"):
        raise ValueError(f"--max-shard-size-mb must be a finite size > 0 (MiB), got {args.max_shard_size_mb}")
    with hf_files.atomic_output_dir(args.out, overwrite=args.overwrite, inputs=inputs) as temp:
        checkpoint.launch(checkpoint.mcore_to_hf_rank, 1, str(mcore_dir), str(temp),
                          int(args.max_shard_size_mb * 2**20), args.hf_layout)
        with hf_files.explaining_write_failures(temp):
            hf_files.copy_side_files(mcore_dir / checkpoint.HF_SIDE_DIR, temp)
            hf_files.record_dtype(temp, checkpoint.DTYPES[info["dtype"]])
    print(f"wrote HF checkpoint ({args.hf_layout} tensor names) to {args.out}")
    return 0


def _verify(args) -> int:
    import math

    from megatron_avar.convert.verify import VERIFY_DTYPES, verify

    if not (math.isfinite(args.max_abs_diff) and args.max_abs_diff >= 0):  # (a check nothing can pass, minutes later)
        raise ValueError(f"--max-abs-diff {args.max_abs_diff}: give a finite tolerance >= 0")
    max_diff, mean_diff = verify(args.hf_path.absolute(), args.mcore_path.absolute(), tp=args.tp, pp=args.pp,
                                 dtype=VERIFY_DTYPES[args.dtype])
    ok = max_diff <= args.max_abs_diff
    print(f"logits |HF - megatron|: max {max_diff:.3e}, mean {mean_diff:.3e} (tolerance {args.max_abs_diff:.1e}): "
          f"{'OK' if ok else 'FAILED'}")
    return 0 if ok else 1
