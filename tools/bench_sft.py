"""Benchmark one AVAR SFT step: step time and peak memory of AVAR's mass modes against plain SFT baselines.

  python tools/bench_sft.py                          # GPU: 7B widths, 4 layers, bf16, seq 4096 and 8192
  python tools/bench_sft.py --layers 8 --seq-lens 4096 8192 16384
  python tools/bench_sft.py --device cpu --hidden 1024 --heads 8 --kv-heads 2 --layers 4 --seq-lens 4096 \
      --modes off probe                              # CPU: attention a real share of the step
  python tools/bench_sft.py --device cpu --tiny      # CPU smoke run of the same code path (< 60 s); its
                                                     # results are named *_cpu-smoke_* and are not a benchmark

Model: Qwen2.5-VL-7B's published config (tests/models/qwen_vl_real_configs.py: hidden 3584, 28 query / 4 kv
heads, head dim 128, FFN 18944, vocab 152064; vision 1280 wide) with fewer language layers (--layers) and
vision blocks (--vision-depth), random weights (megatron's own initialisation; nothing is downloaded).
--hidden / --heads / --kv-heads change the language widths (head dim stays 128: the mrope sections need it;
FFN = 4 x hidden) and narrow the vision tower (128 wide), so attention is a real share of a CPU step; --tiny
scales everything down for the CPU smoke run.

Data: one procedural visual-reasoning sample per packed row (megatron_avar.data.procedural), its image sized
so that the sample fills ~80-90% of the sequence: the worst case for attention (one S-token sequence, not many
short packed ones). Batch = 1 row, TP = PP = DP = 1, the trainer's own train_step (forward, backward, optimizer).

Modes, each measured in a fresh process (so peak memory is its own; but see --paired), same data and seed:
  off       baseline, plain SFT: no AVAR layer; every layer's attention is the platform's fastest causal attention
            (ops.causal_attention "auto": SDPA per sample, FlashAttention-2 on GPU), no masses, no AGTO term
  probe     AVAR SFT as it runs by default: AGTO on (alpha = beta = 0.15), the same attention for the output,
            the masses of AGTO's query rows from the role_mass probe
  probe-triton  (GPU only) as probe, with the output from our Triton kernel with masses compiled out
            (model.role_attention_impl=triton): the other route "auto" takes (many packed samples, fp32)
  fused     AGTO on, output and every row's masses from the fused role_attention kernel
  hf-sdpa   Hugging Face's Qwen2.5-VL with SDPA attention, plain LM loss, torch AdamW, same config and tokens:
            what users run without AVAR (bf16: fp32 weights under bf16 autocast, as HF Trainer's bf16=True)
Step time: median of --steps steps after --warmup steps; with --rounds R, every (length, mode) is measured R times,
the rounds interleaved (off, probe, ..., off, probe, ...: a slow minute of a shared machine falls on both), and
the median is over every round's steps; "min s" is the fastest step and "spread" (max - min) / median, the
run-to-run noise the comparison has to be read against. --profile runs one more step under torch.profiler and
reports the time spent inside the role_mass probe's two autograd functions (forward and backward, their kernels
included: CUDA time on a GPU, CPU time on the CPU) over that step's wall time — the probe's own cost, free of
that noise, and a lower bound of AVAR's: the AGTO loss terms and the per-batch row bookkeeping are not in it.
--paired measures off and probe in one process instead: one model whose layers are all AVAR layers, every step's
batch run in both modes (an off step passes no sink, so its layers compute the output only, as standard layers
do), which goes first alternating; "paired vs off" is the median over steps of probe's time over off's. Both
modes then see the same allocator, page and cache state — on a CPU, separate processes of the same step differ
by more than the probe costs. On the CPU the two share one peak RSS: no peak memory then (run without --paired).
Peak memory: megatron_avar.platform.peak_memory_bytes (CUDA max allocated over the timed steps, from what the
warm-up left held; CPU peak RSS) after the last timed step.
Overheads are relative to "off". "planned GB" (GPU, our trainer's modes): `avar plan`'s predicted peak for the
same config and row (its image tokens, AGTO query rows and labelled tokens), so a GPU run of this benchmark
validates the plan.

FLOPs (for TFLOP/s and MFU): megatron_avar.training.metrics.training_flops (batch_flops) of the step's rows —
  6·(P_lm - V·h)·T + 6·V·h·T_out + 6·L·d·Σ s_i² + 6·P_vision·Σ p_j + 12·hv·F·Σ p_j²
(T real tokens, T_out the labelled ones (the output layer runs on those only), s_i sample lengths, L layers, d
hidden size, p_j patches of image j, F full-attention vision blocks of width hv; attention fwd+bwd counted 3x its
forward, as the trainer's metric; the masses and AGTO are not counted as useful work);
"attention share" = 6·L·d·Σ s_i² over that total. MFU = TFLOP/s / --peak-tflops (default: the card's dense bf16
peak from megatron_avar.plan.gpus, 989.4 for H100 SXM and H200; recorded in the JSON's meta).

The authors' eager implementation keeps S×S attention probabilities per layer and head: the column
"eager S×S" is L·H·S²·4 bytes·2 (fp32 probabilities, forward copy + the copy saved for backward) for this
model's L and, beside it, for the full 28-layer 7B (at 8k: 421 GB; the issue's ~105 GB is L·H·S²·2 bytes, one
bf16 copy).

Targets: probe <= 1.05x off in step time and <= +5% peak memory on CPU; <= 1.03x on GPU (7B widths, 8k and 16k).

Results: tools/results/bench_sft_<hardware>_<date>.md and .json, with the commit, written after every row. CPU
smoke runs are named bench_sft_cpu-smoke_<host>_<date> and are not GPU results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform as host_platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = ("off", "probe", "probe-triton", "fused", "hf-sdpa")
AVAR_MODES = ("probe", "probe-triton", "fused")  # AGTO on
PROBE_MODES = ("probe", "probe-triton")  # masses from the role_mass probe
TEXT_RESERVE_TOKENS = 150  # a procedural sample's text (prompt + reasoning + answer): ~115-135 tokens
FULL_7B_LAYERS, FULL_7B_HEADS = 28, 28


def model_config(args) -> dict:
    """The HF config.json of Qwen2.5-VL-7B with ``args.layers`` LM layers and ``args.vision_depth`` vision blocks,
    and the language widths of --hidden / --heads / --kv-heads (or --tiny's)."""
    sys.path.insert(0, str(REPO / "tests" / "models"))
    from qwen_vl_real_configs import QWEN2_5_VL_7B

    config = json.loads(json.dumps(QWEN2_5_VL_7B))
    config.update(num_hidden_layers=args.layers, max_window_layers=args.layers)
    vision = config["vision_config"]
    vision.update(depth=args.vision_depth, fullatt_block_indexes=[args.vision_depth - 1])
    if args.tiny:  # head dim stays 128 (the mrope sections need it); everything else small
        config.update(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, intermediate_size=512)
        vision.update(hidden_size=128, num_heads=2, intermediate_size=256, out_hidden_size=256)
    if args.hidden:
        heads = args.heads or args.hidden // 128
        if args.hidden != 128 * heads or heads % (args.kv_heads or 1):
            raise SystemExit(f"--hidden {args.hidden} needs --heads = hidden / 128 (head dim 128, for mrope) and "
                             "--kv-heads dividing --heads")
        config.update(hidden_size=args.hidden, num_attention_heads=heads, num_key_value_heads=args.kv_heads or heads,
                      intermediate_size=4 * args.hidden)
        # A narrow vision tower, so the language model's attention is a real share of the step (a 7B-wide
        # tower over a 4k-token image costs as much as the whole 1024-wide language model on a CPU).
        vision.update(hidden_size=128, num_heads=2, intermediate_size=256, out_hidden_size=args.hidden)
    return config


def image_side_pixels(seq_length: int) -> int:
    """Side of a square image whose merged tokens ((side/28)²) plus the text fill ~80-90% of ``seq_length``
    (more than half: the packer then puts exactly one sample in each row)."""
    tokens = max(4, int(0.9 * seq_length) - TEXT_RESERVE_TOKENS)
    return 28 * max(2, int(math.sqrt(tokens)))


def prepare(work: Path, args) -> dict[int, dict]:
    """Write the model directory (config + tokenizer/processor, no weights) and one dataset per length."""
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.processor import load_processor

    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(model_config(args)))
    largest = image_side_pixels(max(args.seq_lens)) ** 2
    load_processor(None, min_pixels=56 * 56, max_pixels=largest, reasoning_tokens=True).save_pretrained(model_dir)
    datasets = {}
    for seq in args.seq_lens:
        side = image_side_pixels(seq)
        path = write_dataset(ProceduralConfig(num_samples=4, image_size=(side, side)), work / f"data_{seq}",
                             overwrite=True)
        datasets[seq] = {"path": str(path), "image_side": side}
    return {"model": str(model_dir), "datasets": datasets}


def worker(spec: dict) -> list[dict]:
    """The modes of ``spec["modes"]`` at one sequence length in this process: build, warm up, time ``steps``
    steps. One mode: its own model. Two (--paired: off and probe): one model, and every step runs the same batch in
    both modes, in alternating order (off first, then probe first, ...)."""
    import torch

    from megatron_avar import platform
    from megatron_avar.config import load_config
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.training.metrics import batch_flops, sample_lengths
    from megatron_avar.training.sft_data import SFTDataLoader

    modes, seq, rnd = spec["modes"], spec["seq_length"], spec["round"]
    name = "+".join(modes)
    alpha = 0.15 if any(mode in AVAR_MODES for mode in modes) else 0.0  # paired: the off steps pass no sink
    config = load_config(SFTConfig, None, [
        f"out={spec['work']}/run_{name}_{seq}_{rnd}", f"model.hf_path={spec['model']}", f"data.path={spec['data']}",
        f"data.seq_length={seq}", f"data.max_pixels={spec['image_side'] ** 2}", "train.global_batch_size=1",
        f"train.precision={spec['precision']}",
        f"train.steps={len(modes) * (spec['warmup'] + spec['steps']) + int(spec['profile'])}",
        f"avar.alpha={alpha}", f"avar.beta={alpha}", "optim.lr=1.0e-6",
        f"model.mass_mode={'fused' if 'fused' in modes else 'probe'}",
        f"model.role_attention_impl={'triton' if 'probe-triton' in modes else 'auto'}"])
    qwen = Qwen25VLConfig.from_hf(config.model.hf_path)
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    data = SFTDataLoader(dataclasses.replace(config.data, processor_path=config.model.hf_path), global_batch_size=1,
                         dp_rank=0, dp_size=1)
    step_fns = ({"hf-sdpa": _hf_sdpa_steps(config, dtype)} if modes == ["hf-sdpa"] else
                _megatron_steps(config, qwen, dtype, modes))
    batches = iter(data)
    timed = timed_steps(step_fns, batches, warmup=spec["warmup"], steps=spec["steps"])
    times, peaks, failed = timed.seconds, timed.peak_bytes, timed.failed
    flops, attention, tokens = [], [], []
    for batch in timed.batches:
        lengths = sample_lengths(batch)
        tokens.append(batch.num_real_tokens)
        total = batch_flops(qwen, batch)
        flops.append(total)
        attention.append(6 * qwen.text.num_layers * qwen.text.hidden_size * sum(n * n for n in lengths) / total)
    # Read before the profiled step, whose profiler holds memory. On the CPU two modes share one process's peak RSS:
    # none is reported for either (the unpaired runs measure memory).
    shared_rss = len(modes) > 1 and not platform.cuda_available()
    profiled = {mode: _profiled_probe_seconds(step_fns[mode], next(batches))
                for mode in modes if spec["profile"] and mode in PROBE_MODES and mode not in failed}
    # off's plan is plain SFT's (paired, the worker's config has AGTO on for the probe steps)
    plain = dataclasses.replace(config, avar=dataclasses.replace(config.avar, alpha=0.0, beta=0.0))
    results = []
    for mode in modes:
        if mode in failed:
            results.append({"mode": mode, "seq_length": seq, "round": rnd, "error": failed[mode]})
            continue
        median = statistics.median(times[mode])
        profile = profiled.get(mode)
        planned = (_planned_peak_gb(plain if mode == "off" else config, qwen, batch)
                   if mode in ("off", *AVAR_MODES) else None)
        results.append({
            "mode": mode, "seq_length": seq, "round": rnd, "step_seconds": median, "step_seconds_all": times[mode],
            "paired_with": [other for other in modes if other != mode],
            "probe_seconds": None if profile is None else profile[0],
            "profiled_step_seconds": None if profile is None else profile[1],
            "planned_peak_gb": planned,
            "real_tokens": statistics.median(tokens), "tflops": statistics.median(flops) / median / 1e12,
            "attention_share": statistics.median(attention),
            "peak_memory_gb": None if shared_rss else peaks[mode] / 1e9, "device": str(platform.current_device()),
            "gpu_name": torch.cuda.get_device_name() if platform.cuda_available() else None,
            "layers": qwen.text.num_layers, "heads": qwen.text.num_attention_heads,
            "autotune_choices": _autotune_choices()})
    return results


@dataclasses.dataclass
class TimedSteps:
    seconds: dict[str, list[float]]  # per mode, one per timed step
    peak_bytes: dict[str, int]       # per mode, the most any of its timed steps held (platform.peak_memory_bytes)
    failed: dict[str, str]           # paired: a mode whose step raised ("OOM" or the error), left out after it
    batches: list                    # the timed steps' batches


def timed_steps(step_fns: dict, batches, *, warmup: int, steps: int) -> TimedSteps:
    """``warmup`` then ``steps`` steps, each of its own batch run by every mode of ``step_fns``, which mode goes
    first alternating from step to step. With two modes (--paired) a mode whose step raises (out of memory at a
    long row) is recorded as failed and the other goes on; a step that raises with one mode left raises."""
    import torch

    from megatron_avar import platform

    modes = list(step_fns)
    result = TimedSteps({mode: [] for mode in modes}, dict.fromkeys(modes, 0), {}, [])
    for step in range(warmup + steps):
        batch = next(batches)
        timed = step >= warmup
        for mode in modes if step % 2 == 0 else modes[::-1]:
            if mode in result.failed:
                continue
            if timed:
                platform.reset_peak_memory()  # not the warm-up's one-off buffers (Triton autotuning's) nor the
                # other mode's step (CUDA; a no-op on the CPU, whose peak RSS is the process's)
            started = time.monotonic()
            try:
                step_fns[mode](batch)  # ends in a host read of the loss: synchronised
            except Exception as error:  # noqa: BLE001 — paired: recorded as this mode's result, the other goes on
                if len(result.failed) == len(modes) - 1:
                    raise
                traceback.print_exc()
                result.failed[mode] = "OOM" if "out of memory" in str(error).lower() else \
                    f"{type(error).__name__}: {error}"[:300]
                if platform.cuda_available():
                    torch.cuda.empty_cache()  # what the failed step held, for the other mode's steps
                continue
            if timed:
                result.seconds[mode].append(time.monotonic() - started)
                result.peak_bytes[mode] = max(result.peak_bytes[mode], platform.peak_memory_bytes())
        if timed:
            result.batches.append(batch)
    return result


# The role_mass probe's autograd functions, ops.role_mass._BlockwiseRoleMass and ops.role_mass_triton._TritonRoleMass
# (forward; the backward's event is the name + "Backward"); tests/test_bench_sft.py checks the names.
PROBE_FUNCTIONS = ("_BlockwiseRoleMass", "_TritonRoleMass")


def _profiled_probe_seconds(step_fn, batch) -> tuple[float, float] | None:
    """One more step under torch.profiler: (seconds inside the probe's autograd functions, forward + backward,
    their kernels included — device time on a GPU, CPU time on the CPU; the step's wall seconds under the
    profiler); None when the profile holds none of them (not a 0% share)."""
    import torch

    from megatron_avar import platform

    names = {*PROBE_FUNCTIONS, *(f"{name}Backward" for name in PROBE_FUNCTIONS)}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if platform.cuda_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.monotonic()
        step_fn(batch)
        seconds = time.monotonic() - started
    events = [e for e in prof.key_averages() if e.key in names]
    inside = sum(e.device_time_total if platform.cuda_available() else e.cpu_time_total for e in events)
    if not events or inside <= 0:
        print(f"[bench_sft] --profile: no time inside {sorted(names)} in the profiled step", flush=True)
        return None
    return inside / 1e6, seconds


def _autotune_choices() -> dict | None:
    """The Triton candidates this worker's autotuning chose (None where no Triton GPU kernel ran)."""
    if "megatron_avar.ops.role_attention_triton" not in sys.modules:
        return None
    return sys.modules["megatron_avar.ops.role_attention_triton"].autotune_choices()


def _planned_peak_gb(config, qwen, batch) -> float | None:
    """`avar plan`'s predicted peak (GB) for this step's row (its image tokens, AGTO query rows, labelled tokens),
    with the GPU kernel family; None on a CPU, where the measured peak is the process's RSS, not tensors."""
    from megatron_avar import platform
    from megatron_avar.plan import Assumptions, microbatch_row_counts, plan_sft

    if not platform.cuda_available():
        return None
    seq = config.data.seq_length
    image_tokens, queries, labelled = microbatch_row_counts(batch.microbatches[0], image_token_id=qwen.image_token_id,
                                                            exclude_sink=config.avar.exclude_sink)
    assumptions = Assumptions(gpus=1, image_fraction=image_tokens / seq, query_fraction=queries / seq,
                              response_fraction=labelled / seq, sample_tokens=batch.num_real_tokens, kernels="gpu")
    return plan_sft(config, qwen, "bench", assumptions).memory.peak / 1e9


def _megatron_steps(config, qwen, dtype, modes):
    """train_step of our trainer, one per mode, on one model: every layer an AVAR layer when a mode runs AGTO (its
    step passes the AGTO sink; an "off" step passes none, so its layers compute the output only, as standard layers
    do), no AVAR layer when "off" is the only mode."""
    from megatron_avar.sft.trainer import train_step
    from megatron_avar.training.megatron_setup import build_model, build_optimizer, init_distributed

    layout = init_distributed(1, 1, seed=config.train.seed)
    avar_layers = tuple(range(qwen.text.num_layers)) if any(mode in AVAR_MODES for mode in modes) else ()
    model = build_model(qwen, config.parallel, dtype=dtype, recompute="none", role_mass_layers=avar_layers,
                        hf_path=None)
    build_optimizer(model, config.optim, steps=config.train.steps, dtype=dtype)

    def step(layers):
        return lambda batch: train_step(model, batch, config, avar_layers=layers, layout=layout)

    return {mode: step(() if mode == "off" else avar_layers) for mode in modes}


def _hf_sdpa_steps(config, dtype):
    """Hugging Face's Qwen2.5-VL (SDPA attention, random weights) trained with its own LM loss and AdamW on
    the same rows (each row one sample here; its padding masked), as a user without AVAR would: in bf16 as the
    HF Trainer's ``bf16=True`` runs it (fp32 weights and Adam states, bf16 autocast: the same precision scheme as
    megatron's fp32 main weights), gradients clipped at optim.clip_grad as ours are."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_avar import platform
    from megatron_avar.roles import IGNORE_INDEX

    device = platform.current_device()
    hf_config = Qwen2_5_VLConfig.from_pretrained(config.model.hf_path)
    with device:  # weights drawn where they live: HF's host initialisation of 2B parameters takes ~30 s
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config, attn_implementation="sdpa",
                                                                torch_dtype=torch.float32)
    model.to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    image_token_id = hf_config.image_token_id

    def step(batch):
        for mb in batch.microbatches:
            real = ((mb.segment_ids >= 0) if mb.segment_ids is not None
                    else torch.ones_like(mb.input_ids, dtype=torch.bool))
            input_ids = mb.input_ids.to(device)
            # our labels hold the next token at each position; HF shifts its labels itself
            labels = torch.where(torch.roll(mb.labels, 1, dims=1) != IGNORE_INDEX, mb.input_ids, -100).to(device)
            with autocast:
                loss = model(input_ids=input_ids, attention_mask=real.long().to(device), labels=labels,
                             pixel_values=None if mb.pixel_values is None else mb.pixel_values.to(device),
                             image_grid_thw=None if mb.image_grid_thw is None else mb.image_grid_thw.to(device),
                             mm_token_type_ids=(input_ids == image_token_id).int()).loss
            loss.backward()
        if config.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def run_worker(spec: dict, device: str) -> list[dict]:
    """The worker's results, one per mode of ``spec["modes"]``, or one error result per mode where it failed."""
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # The worker writes straight to its log: one stopped from outside (a time limit) still leaves its output.
    log = Path(spec["work"]) / f"worker_{'+'.join(spec['modes'])}_{spec['seq_length']}_{spec['round']}.log"
    with open(log, "w") as sink:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, stdout=sink,
                              stderr=subprocess.STDOUT, cwd=REPO)
    output = log.read_text(errors="replace")
    lines = [line for line in output.splitlines() if line.startswith("BENCH_RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"[bench_sft] worker failed (exit {done.returncode}); its output: {log}; the end of it:\n"
              + "\n".join(output.strip().splitlines()[-25:]), flush=True)
        oom = "out of memory" in output.lower()
        # The exception line, not the last line (which can be a warning printed at exit).
        raised = [line for line in (re.sub(r"^\[rank\d+\]: ", "", x) for x in output.splitlines())
                  if re.match(r"^[\w.]*(Error|Exception)\b", line)]
        error = "OOM" if oom else f"exit {done.returncode}: {raised[-1] if raised else 'no exception printed'}"[:300]
        return [{"mode": mode, "seq_length": spec["seq_length"], "round": spec["round"], "error": error}
                for mode in spec["modes"]]
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def eager_attention_gb(layers: int, heads: int, seq: int) -> float:
    """The authors' eager attention probabilities: L·H·S²·4 bytes (fp32) x 2 (forward + saved for backward)."""
    return layers * heads * seq * seq * 4 * 2 / 1e9


def merge_rounds(results: list[dict]) -> dict[tuple[int, str], dict]:
    """One result per (length, mode) from its rounds: the median over every round's steps, the fastest step, the
    spread (max - min) / median, the highest peak memory; the first error where no round measured."""
    merged: dict[tuple[int, str], dict] = {}
    for key in dict.fromkeys((r["seq_length"], r["mode"]) for r in results):
        rounds = [r for r in results if (r["seq_length"], r["mode"]) == key]
        measured = [r for r in rounds if "step_seconds" in r]
        if not measured:
            merged[key] = rounds[0]
            continue
        steps = [t for r in measured for t in r["step_seconds_all"]]
        median = statistics.median(steps)
        first = measured[0]
        probe = [r["probe_seconds"] / r["profiled_step_seconds"] for r in measured
                 if r.get("probe_seconds") is not None]
        merged[key] = {**first, "step_seconds": median, "step_seconds_all": steps, "step_seconds_min": min(steps),
                       "spread": (max(steps) - min(steps)) / median, "rounds": len(measured),
                       "rounds_failed": len(rounds) - len(measured),
                       "tflops": first["tflops"] * first["step_seconds"] / median,
                       "peak_memory_gb": max(peaks) if (peaks := [r["peak_memory_gb"] for r in measured
                                                                   if r["peak_memory_gb"] is not None]) else None,
                       "probe_share": statistics.median(probe) if probe else None,
                       "paired_ratio": paired_ratio(results, *key)}
    return merged


def paired_ratio(results: list[dict], seq: int, mode: str) -> float | None:
    """The median over every paired step (--paired: one process, the same batch in both modes) of this mode's step
    time over off's; None where ``mode`` was not measured paired with off."""
    ratios = []
    for r in results:
        if r["seq_length"] != seq or r["mode"] != mode or "off" not in r.get("paired_with", ()) or "error" in r:
            continue
        off = next((o for o in results if (o["seq_length"], o["mode"], o["round"]) == (seq, "off", r["round"])
                    and "error" not in o), None)
        if off is not None:
            ratios += [t / base for t, base in zip(r["step_seconds_all"], off["step_seconds_all"], strict=True)]
    return statistics.median(ratios) if ratios else None


def table(results: list[dict], args, peak_tflops: float | None) -> list[dict]:
    rows = []
    merged = merge_rounds(results)
    for seq in args.seq_lens:
        base = merged.get((seq, "off"), {})
        for mode in args.modes:
            r = merged.get((seq, mode), {})
            row = {"seq_length": seq, "mode": mode, "error": r.get("error")}
            if "step_seconds" in r:
                row.update(step_seconds=r["step_seconds"], step_seconds_min=r["step_seconds_min"],
                           spread=r["spread"], rounds=r["rounds"], rounds_failed=r["rounds_failed"],
                           probe_share=r["probe_share"], real_tokens=r["real_tokens"], tflops=r["tflops"],
                           attention_share=r["attention_share"],
                           mfu=r["tflops"] / peak_tflops if peak_tflops else None,
                           peak_memory_gb=r["peak_memory_gb"], paired_ratio=r["paired_ratio"],
                           planned_peak_gb=r.get("planned_peak_gb"),
                           eager_attention_gb=eager_attention_gb(r["layers"], r["heads"], seq),
                           eager_attention_gb_full_7b=eager_attention_gb(FULL_7B_LAYERS, FULL_7B_HEADS, seq))
                if "step_seconds" in base:
                    row.update(step_time_overhead=r["step_seconds"] / base["step_seconds"] - 1,
                               min_step_time_overhead=r["step_seconds_min"] / base["step_seconds_min"] - 1)
                if "step_seconds" in base and None not in (r["peak_memory_gb"], base["peak_memory_gb"]):
                    row.update(extra_memory_gb=r["peak_memory_gb"] - base["peak_memory_gb"],
                               extra_memory_fraction=r["peak_memory_gb"] / base["peak_memory_gb"] - 1)
            rows.append(row)
    return rows


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:+.1f}%"


def markdown(rows: list[dict], meta: dict) -> str:
    rounds = meta["rounds"]
    steps = (f"median of {meta['steps']} steps after {meta['warmup']} warm-up" if rounds == 1 else
             f"median of {rounds} interleaved rounds x {meta['steps']} steps, each after {meta['warmup']} warm-up")
    lines = [f"# AVAR SFT step benchmark ({meta['hardware']}, {meta['date']})", "",
             f"Commit `{meta['commit']}`. {meta['model']}. Batch 1 row, TP=PP=DP=1, {meta['precision']}, {steps}. "
             "Baseline: mode `off` (plain SFT, the same fast attention, no masses). Targets: probe <= 1.05x off "
             "(CPU), <= 1.03x (GPU); memory <= +5%. \"spread\": (slowest - fastest step) / median, the noise "
             "the ratios are read against; \"paired vs off\" (--paired): the median over steps of the mode's time "
             "over off's on the same batch, both run in one process, alternating (no peak memory on the CPU "
             "there: the two share one RSS); \"probe share\" (--profile): the time inside the role_mass probe "
             "(forward + backward) over a profiled step's, a lower bound of AVAR's cost (not the AGTO loss). "
             "FLOP formula and modes: tools/bench_sft.py.",
             "",
             "| seq | mode | step s | vs off | min s | min vs off | paired vs off | spread | probe share | peak GB "
             "| planned GB | extra GB vs off | tokens | TFLOP/s | attention share | MFU | eager S×S GB (this L) "
             "| eager S×S GB (28 L) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error") or "step_seconds" not in r:
            lines.append(f"| {r['seq_length']} | {r['mode']} | {r.get('error') or 'not measured'} |" + " |" * 15)
            continue
        paired = r.get("paired_ratio")
        paired_cell = ("baseline" if any(row.get("paired_ratio") is not None for row in rows) else "—") \
            if r["mode"] == "off" else _percent(None if paired is None else paired - 1)
        baseline = r["mode"] == "off"
        lines.append(f"| {r['seq_length']} | {r['mode']} | {r['step_seconds']:.3f} | "
                     f"{'baseline' if baseline else _percent(r.get('step_time_overhead'))} | "
                     f"{r['step_seconds_min']:.3f} | "
                     f"{'baseline' if baseline else _percent(r.get('min_step_time_overhead'))} | "
                     f"{paired_cell} | "
                     f"{100 * r['spread']:.0f}% | "
                     f"{_fmt(None if r.get('probe_share') is None else 100 * r['probe_share'], '.2f')}"
                     f"{'%' if r.get('probe_share') is not None else ''} | "
                     f"{_fmt(r['peak_memory_gb'], '.2f')} | {_fmt(r.get('planned_peak_gb'), '.2f')}"
                     f" | {_fmt(r.get('extra_memory_gb'), '+.2f')} | "
                     f"{r['real_tokens']:.0f} | "
                     f"{r['tflops']:.2f} | {100 * r['attention_share']:.0f}% | "
                     f"{'—' if r.get('mfu') is None else format(100 * r['mfu'], '.1f') + '%'} | "
                     f"{r['eager_attention_gb']:.1f} | "
                     f"{r['eager_attention_gb_full_7b']:.1f} |")
    if any(r.get("rounds_failed") for r in rows):
        lines += ["", "Rounds not run or failed (their rows use the rounds that measured): "
                  + ", ".join(f"{r['seq_length']} {r['mode']}: {r['rounds_failed']}" for r in rows
                              if r.get("rounds_failed"))]
    return "\n".join(lines) + "\n"


def write_results(results: list[dict], args, precision: str, commit: str, date: str, seconds: float,
                  stem: Path | None = None):
    """tools/results/bench_sft_<hardware>_<date>.md and .json of the rows measured so far (at ``stem``: this run's
    files, from its first call; the first call picks a name no earlier run's results have)."""
    from results_meta import results_stem

    gpu = next((r["gpu_name"] for r in results if r.get("gpu_name")), None)
    peak_tflops = args.peak_tflops
    if peak_tflops is None and gpu is not None:
        from megatron_avar.plan.gpus import gpu_of_device

        card = gpu_of_device(gpu)
        peak_tflops = None if card is None else card.peak_tflops[precision]
    rows = table(results, args, peak_tflops)
    hardware = (gpu or "").replace(" ", "-").lower() if args.device == "cuda" else f"cpu-smoke_{host_platform.node()}"
    widths = ""
    if args.hidden:
        heads = args.heads or args.hidden // 128
        widths = f" (hidden {args.hidden}, {heads}/{args.kv_heads or heads} heads)"
    meta = {"hardware": hardware, "date": date, "commit": commit,
            "model": (f"Qwen2.5-VL-7B widths{' (tiny: scaled down)' if args.tiny else ''}{widths}, "
                      f"{args.layers} LM layers, {args.vision_depth} vision blocks"),
            "precision": precision, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "seconds": seconds,
            "mfu_peak_tflops": peak_tflops,
            "argv": sys.argv[1:]}
    stem = stem or results_stem(args.results, f"bench_sft_{hardware}_{date}")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "raw": results}, indent=2) + "\n")
    text = markdown(rows, meta)
    stem.with_suffix(".md").write_text(text)
    return stem, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small widths and sequences (CPU smoke run)")
    parser.add_argument("--layers", type=int, default=None, help="LM layers (default 4; --tiny: 2)")
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=None, help="language hidden size (a multiple of 128)")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default hidden / 128)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 4096 8192; --tiny: 512")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="default all (CPU: not probe-triton); --tiny: off probe")
    parser.add_argument("--warmup", type=int, default=None, help="default 3; --tiny: 1")
    parser.add_argument("--steps", type=int, default=None, help="default 5; --tiny: 2")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every (length, mode) this many times, the rounds interleaved (a noisy shared "
                             "machine: 3 on the CPU); the median is over every round's steps")
    parser.add_argument("--paired", action="store_true",
                        help="measure off and probe in one process on one model, each step's batch in both modes, "
                             "alternating which goes first: the same memory and page state for both (a CPU's "
                             "per-process noise); no peak memory on the CPU (one RSS)")
    parser.add_argument("--profile", action="store_true",
                        help="one more step per probe worker under torch.profiler: the probe's own share of a step")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator per GPU (default: the card's dense bf16 peak, for H100 SXM and H200; "
                             "no MFU for other cards or the CPU)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no measurement that would end past this many seconds from the start, judged by "
                             "the longest one so far (a time-limited run keeps whole measurements, names the rest)")
    parser.add_argument("--work", default="runs/bench_sft", help="scratch directory (model config, data)")
    parser.add_argument("--results", default=str(REPO / "tools" / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("BENCH_RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    tiny = args.tiny
    args.layers = args.layers or (2 if tiny else 4)
    args.vision_depth = 1 if tiny else args.vision_depth
    args.seq_lens = args.seq_lens or ([512] if tiny else [4096, 8192])
    args.modes = args.modes or (["off", "probe"] if tiny else
                                [m for m in MODES if args.device == "cuda" or m != "probe-triton"])
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.steps = args.steps or (2 if tiny else 5)
    if "off" not in args.modes:
        args.modes.insert(0, "off")  # the baseline column is not optional
    from megatron_avar import platform

    if args.device == "cuda" and not platform.cuda_available():
        raise SystemExit("bench_sft: no CUDA device here; run on a GPU, or `--device cpu --tiny` for a smoke run")
    if args.device == "cpu" and "probe-triton" in args.modes:
        raise SystemExit("bench_sft: mode probe-triton runs the Triton kernels, which need a CUDA GPU; leave it out "
                         "with --device cpu")
    work = Path(args.work).resolve()
    started = time.monotonic()
    prepared = prepare(work, args)
    precision = "bf16" if args.device == "cuda" else "fp32"
    from results_meta import git_commit

    date = datetime.date.today().isoformat()
    stem = None
    commit = git_commit("megatron_avar", "tools/bench_sft.py")
    results = []
    # The pair the targets compare (plain SFT and AVAR with the probe) at every length first, then the other
    # modes: a run stopped part-way (a time limit) keeps the comparison that matters most.
    first = [mode for mode in ("off", "probe") if mode in args.modes]
    if args.rounds < 1:
        raise SystemExit(f"bench_sft: --rounds must be at least 1, got {args.rounds}")
    if args.paired and first != ["off", "probe"]:
        raise SystemExit("bench_sft: --paired measures off and probe in one process; add probe to --modes")
    # With --rounds, each group's rounds interleave (off, probe, off, probe, ...): drift falls on both modes.
    rounds = range(args.rounds)
    rest = [mode for mode in args.modes if mode not in first]
    groups = [first] if args.paired else [[mode] for mode in first]
    jobs = ([(rnd, seq, modes) for rnd in rounds for seq in args.seq_lens for modes in groups]
            + [(rnd, seq, [mode]) for rnd in rounds for seq in args.seq_lens for mode in rest])
    longest = 0.0  # seconds per mode of the longest measurement so far (a paired one measures two)
    for rnd, seq, modes in jobs:
        elapsed, name, expected = time.monotonic() - started, "+".join(modes), longest * len(modes)
        if args.deadline_s is not None and elapsed + expected > args.deadline_s:
            print(f"[bench_sft] seq {seq} {name} round {rnd}: not run (--deadline-s {args.deadline_s:.0f}: "
                  f"{elapsed:.0f} s spent, measuring {len(modes)} mode(s) would take {expected:.0f} s, judged by "
                  "the longest so far)", flush=True)
            results += [{"mode": mode, "seq_length": seq, "round": rnd,
                         "error": f"not run: --deadline-s {args.deadline_s:.0f}"} for mode in modes]
            stem, text = write_results(results, args, precision, commit, date, time.monotonic() - started, stem)
            continue
        measured = time.monotonic()
        spec = {"modes": modes, "seq_length": seq, "work": str(work), "model": prepared["model"],
                "data": prepared["datasets"][seq]["path"], "image_side": prepared["datasets"][seq]["image_side"],
                "precision": precision, "warmup": args.warmup, "steps": args.steps, "round": rnd,
                "profile": args.profile}
        for result in run_worker(spec, args.device):
            peak = result.get("peak_memory_gb")
            print(f"[bench_sft] seq {seq} {result['mode']} round {rnd}: " + (result.get("error") or
                  f"{result['step_seconds']:.3f} s/step, peak " + ("—" if peak is None else f"{peak:.2f} GB")),
                  flush=True)
            results.append(result)
        longest = max(longest, (time.monotonic() - measured) / len(modes))
        # Written after every measurement: a run stopped part-way keeps what it measured.
        stem, text = write_results(results, args, precision, commit, date, time.monotonic() - started, stem)
    print(text)
    print(f"[bench_sft] {stem}.md / .json ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
