"""Benchmark the GRPO refit: ``VLLMGenerationBackend.update_weights`` of Qwen2.5-VL-7B-shaped weights handed
over from the trainer's GPU memory, against a plain torch copy of the same bytes.

  python tools/bench_grpo_refit.py                              # one GPU, vLLM TP=1, bf16, 3 repeats
  torchrun --nproc_per_node 2 tools/bench_grpo_refit.py --tp 2  # colocated TP=2 (every rank hands over all weights)
  python tools/bench_grpo_refit.py --help                       # works anywhere; the run needs CUDA and vLLM

Model: the published Qwen2.5-VL-7B config (hidden 3584, 28 layers, 28 query / 4 kv heads, FFN 18944, vocab
152064, untied embeddings; vision 32 blocks of width 1280), validated by
``megatron_avar.models.qwen2_5_vl.config.Qwen25VLConfig.from_hf``. The tensors: the HF names and shapes of
``Qwen2_5_VLForConditionalGeneration`` built on the meta device (transformers-5 names, what the trainer's
``named_weights`` yields), filled with random bf16 values on this GPU (the trainer's TP-gathered weights).
The engine starts from a directory holding only config + tokenizer/processor, with vLLM's
``load_format="dummy"`` (random weights; nothing is downloaded or written).

Measurements (median of --repeats after one warm-up; CUDA-synchronised):
  torch copy_ (baseline)  every tensor ``dst.copy_(src)`` into preallocated bf16 tensors of the same shapes on
                          the same GPU: the floor for moving these bytes device-to-device.
  refit, engine awake     ``update_weights(all tensors)``: collective_rpc -> the model's load_weights (each
                          parameter's weight_loader takes its TP shard) + prefix/encoder cache resets.
  refit, engine asleep    after ``sleep()``: ``update_weights`` first wakes the weights (an H2D copy of the old
                          weights from pinned CPU memory, level-1 sleep), then loads.
  sleep / wake KV         ``sleep()``; ``wake_up()`` after a refit from sleep (the KV cache only).
Bytes moved = Σ numel × 2 (bf16 elements handed over), GB/s = bytes / seconds / 1e9. The baseline column
divides the refit time by the copy_ time of the same bytes.

Results: tools/results/bench_grpo_refit_<gpu>_<date>.md and .json (rank 0), with the commit and vLLM version.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from results_meta import git_commit, results_stem  # noqa: E402

# Qwen2.5-VL-7B-Instruct's config.json (sizes and special-token ids).
QWEN2_5_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                          rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                          rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
QWEN2_5_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                            fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="vLLM tensor-parallel size (WORLD_SIZE must divide by it)")
    parser.add_argument("--layers", type=int, default=28, help="language layers (28 = the real 7B)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (after one warm-up)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="vLLM's share of the GPU while awake (the trainer-side tensors need ~17 GB more)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--results", default=str(REPO / "tools" / "results"), help="output folder")
    return parser.parse_args(argv)


def hf_config(layers: int):
    from transformers import Qwen2_5_VLConfig

    from megatron_avar.models.qwen2_5_vl.config import Qwen25VLConfig

    config = Qwen2_5_VLConfig(text_config={**QWEN2_5_VL_7B_TEXT, "num_hidden_layers": layers},
                              vision_config=QWEN2_5_VL_7B_VISION, image_token_id=151655, video_token_id=151656,
                              vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)
    Qwen25VLConfig.from_hf(config)  # refuses anything the megatron model (the trainer) would not build
    return config


def weight_shapes(config) -> list[tuple[str, torch.Size]]:
    """HF (transformers-5) name and shape of every parameter, from the model built on the meta device."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return [(name, param.shape) for name, param in model.named_parameters()]


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, CUDA-synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)



def measure(backend, shapes, repeats: int):
    """(rows of (name, seconds, bytes or None), baseline seconds, tensors, bytes) — see the module docstring."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    tensors = [(name, 0.02 * torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16))
               for name, shape in shapes]
    num_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
    rows = [("refit, engine awake", timed(lambda: backend.update_weights(tensors), repeats), num_bytes)]
    asleep, sleeps, wakes = [], [], []
    for _ in range(repeats + 1):  # the first round is the warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        backend.sleep()
        torch.cuda.synchronize()
        sleeps.append(time.perf_counter() - start)
        backend.update_weights(tensors)
        asleep.append(backend.last_refit.seconds)
        start = time.perf_counter()
        backend.wake_up()
        torch.cuda.synchronize()
        wakes.append(time.perf_counter() - start)
    rows.append(("refit, engine asleep (wakes the weights)", statistics.median(asleep[1:]), num_bytes))
    rows.append(("sleep (level 1)", statistics.median(sleeps[1:]), None))
    rows.append(("wake KV cache after refit", statistics.median(wakes[1:]), None))
    backend.sleep()  # room for the baseline's destination tensors
    destinations = [torch.empty_like(t) for _, t in tensors]
    baseline = timed(lambda: [d.copy_(t) for d, (_, t) in zip(destinations, tensors)], repeats)
    destinations.clear()  # free the copies before vLLM wakes up
    backend.wake_up()
    return rows, baseline, tensors, num_bytes


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_avar import platform

    if not platform.vllm_available():
        raise SystemExit("bench_grpo_refit needs CUDA and vLLM (the gpu extra: pip install -e .[gpu] on a GPU "
                         "machine); nothing is measured here")
    import vllm

    from megatron_avar.grpo.vllm_backend import VLLMGenerationBackend
    from megatron_avar.processor import load_processor

    platform.bind_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL (and vLLM) touch the device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: the trainer's process group, which vLLM reuses
        torch.distributed.init_process_group(platform.distributed_backend())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    class DummyWeightsBackend(VLLMGenerationBackend):
        def _engine_kwargs(self) -> dict:
            return {**super()._engine_kwargs(), "load_format": "dummy"}

    config = hf_config(args.layers)
    shapes = weight_shapes(config)
    with tempfile.TemporaryDirectory() as directory:  # the engine reads it until it is closed
        config.save_pretrained(directory)
        load_processor(None).save_pretrained(directory)
        backend = DummyWeightsBackend(directory, load_processor(directory), tensor_parallel_size=args.tp,
                                      gpu_memory_utilization=args.gpu_memory_utilization,
                                      max_model_len=args.max_model_len)
        rows, baseline, tensors, num_bytes = measure(backend, shapes, args.repeats)
        backend.close()

    table = [{"measurement": "torch copy_ (baseline)", "seconds": baseline, "bytes": num_bytes,
              "gb_per_s": num_bytes / baseline / 1e9, "x_baseline": 1.0}]
    for name, seconds, moved in rows:
        table.append({"measurement": name, "seconds": seconds, "bytes": moved,
                      "gb_per_s": moved / seconds / 1e9 if moved else None,
                      "x_baseline": seconds / baseline if moved else None})
    gpu = torch.cuda.get_device_name()
    meta = {"date": datetime.date.today().isoformat(),
            "commit": git_commit("megatron_avar", "tools/bench_grpo_refit.py"), "gpu": gpu, "vllm": vllm.__version__,
            "torch": torch.__version__, "tp": args.tp, "layers": args.layers, "num_tensors": len(tensors),
            "bytes_formula": "sum(numel) * 2 (bf16)", "repeats": args.repeats}
    lines = [f"# GRPO refit (VLLMGenerationBackend.update_weights), Qwen2.5-VL-7B shapes ({args.layers} LM layers)",
             "", f"{gpu}, vLLM {vllm.__version__}, TP={args.tp}, commit {meta['commit']}, {meta['date']}; "
             f"{len(tensors)} tensors, {num_bytes / 1e9:.2f} GB (Σ numel × 2). Median of {args.repeats}.", "",
             "| measurement | seconds | GB moved | GB/s | × baseline |", "|---|---|---|---|---|"]
    for row in table:
        moved = f"{row['bytes'] / 1e9:.2f}" if row["bytes"] else "-"
        rate = f"{row['gb_per_s']:.1f}" if row["gb_per_s"] else "-"
        ratio = f"{row['x_baseline']:.1f}" if row["x_baseline"] else "-"
        lines.append(f"| {row['measurement']} | {row['seconds']:.3f} | {moved} | {rate} | {ratio} |")
    print("\n".join(lines))
    if rank == 0:
        hardware = gpu.lower().replace(" ", "-")
        stem = results_stem(args.results, f"bench_grpo_refit_{hardware}_tp{args.tp}_{meta['date']}")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
