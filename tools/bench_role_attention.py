"""Benchmark role_attention: time, TFLOP/s and peak memory, written to tools/results/ (Markdown + JSON).

  python tools/bench_role_attention.py            # GPU part if CUDA + Triton are usable, else CPU part
  python tools/bench_role_attention.py --part cpu --seq-lens 1024 2048 4096

GPU part (Qwen2.5-VL-7B attention: 28 query / 4 kv heads, head_dim 128, bf16, batch 1, causal, 5 roles),
per sequence length (1k-32k), forward and forward+backward, for:
  role_attention[triton]   the fused kernels, masses on (what training uses)
  triton, masses off       the same kernels with mass accumulation compiled out (cost of the masses)
  torch SDPA (flash)       torch's FlashAttention backend, K/V pre-expanded to 28 heads; no masses
  torch SDPA (cuDNN)       torch's cuDNN fused-attention backend, same inputs; no masses
  SDPA cuDNN, GQA          the cuDNN backend on the 4 kv heads (enable_gqa), as our SDPA route would call it
                           (recorded as failed where that backend refuses GQA)
  causal_attention[sdpa]   the AVAR layers' plain attention as they call it (ops.causal_attention, the SDPA route,
                           spans worked out once outside the timed region): GQA in SDPA's kernel, the backend
                           torch's own dispatch picks
  FlexAttention, LSE/role  the nearest public alternative with masses: compiled flex_attention (GQA), one causal
                           call for out and the log-sum-exp over all keys, one more per role with the other roles'
                           keys masked; mass_r = exp(lse_r - lse) (flex_role_attention). Block masks are built
                           once per input, outside the timed region, as a user with fixed roles would.
  role_mass probe          masses of 256 user-text rows only (ops.role_mass), no out: what an AVAR layer adds
                           to the platform's fastest attention; its FLOPs are its own: 2*N*Hq*keys*D forward
                           (Q K^T), x4 forward+backward (the backward recomputes Q K^T, then dQ and dK: the
                           convention below; role sums over R << D columns not counted)
  CP rank of 2             context parallelism's attention (models.context_parallel.local_rows_attention): one
                           rank's half of the rows (its two load-balanced chunks) over the whole row's keys, as
                           after the all-gather (not timed: no second GPU), blocks recomputed in backward; its
                           FLOPs are half the row's, so equal TFLOP/s means as fast per token as flash
  eager + mass             plain PyTorch attention materialising P [B, H, S, S] in bf16 (fp32 softmax),
                           masses from P; the baseline without a fused kernel (OOM at long S)
CPU part (one Qwen2.5-VL-7B GQA group: 7 query / 1 kv head, head_dim 128, fp32): blockwise and torch SDPA
(its CPU flash kernel, no masses) vs reference at 1k/2k/4k, each measurement in a fresh subprocess; peak memory
= growth of the process's peak resident set over its resident set with inputs allocated (/proc/self/clear_refs
resets the peak); time = best of N runs.

GPU time: per call, the median over --reps timed regions, each a run of calls back to back between one pair of
CUDA events (at least 20 ms of them), so a short kernel is not read as its host launch overhead. Results are
written after each length.

FLOP convention (FlashAttention's): forward = 2 matmuls (Q K^T, P V) of 2*S*S*D flops per head, halved
when causal; backward = 2.5x forward (5 matmuls), so forward+backward = 3.5x forward. (The SFT step's
TFLOP/s, training.metrics.training_flops, counts attention forward+backward as 3x its forward, as model-FLOP
counts usually do: kernel and step TFLOP/s are not on the same scale.) Mass accumulation and masking are not
counted as useful flops, so the masses' cost shows as lower TFLOP/s at equal FLOPs. Each GPU row also records
the largest |out| difference between the Triton kernel (as autotuned) and SDPA flash on the same inputs: a check
that the configurations autotuning picked compute the same attention.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform as host_platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from results_meta import git_commit, results_stem  # noqa: E402

from megatron_avar import platform  # noqa: E402
from megatron_avar.models.context_parallel import ContextSplit, local_rows_attention  # noqa: E402
from megatron_avar.ops import role_attention, role_mass  # noqa: E402
from megatron_avar.ops.causal_attention import attention_spans, causal_attention  # noqa: E402
from megatron_avar.ops.role_attention import build_problem, reference_role_attention  # noqa: E402

NUM_ROLES = 5
PROBE_ROWS = 256  # rows the role_mass probe computes: a packed row's AGTO query set is tens to hundreds


def attention_flops(batch, num_q_heads, seq_len, head_dim, causal, with_backward):
    """Useful flops of attention: 4*B*H*S^2*D forward (Q K^T and P V), /2 causal, x3.5 with backward."""
    forward = 4 * batch * num_q_heads * seq_len * seq_len * head_dim
    if causal:
        forward //= 2
    return int(forward * 3.5) if with_backward else forward


def make_inputs(batch, seq_len, num_q_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, seq_len, num_q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, seq_len, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(batch, seq_len, num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    # A chat-like layout: system prefix, a long image span, user text, response.
    cuts = [0, seq_len // 16, seq_len // 2, seq_len * 5 // 8, seq_len]
    roles = torch.empty(batch, seq_len, dtype=torch.long)
    for role, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        roles[:, a:b] = role if role < 3 else 3
    return q, k, v, roles.to(device)


# ----------------------------------------------------------------------------------------------------
# GPU part


def flex_role_attention(q, k, v, roles, num_roles, *, compiled: bool = True):
    """FlexAttention's way to role masses, as a callable: () -> (out [B, S, Hq, D], mass [B, Hq, S, R]).
    q [B, S, Hq, D], k / v [B, S, Hkv, D], roles int [B, S] (-1: never attended). One causal call gives out and
    the log-sum-exp over every allowed key; one call per role with the keys of other roles masked gives lse_r;
    mass_r = exp(lse_r - lse) (0 where a row sees no key of role r). Block masks are built here, once."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    attend = torch.compile(flex_attention) if compiled else flex_attention
    batch, seq = roles.shape
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]

    def mask_of(role):
        def allowed(b, h, q_idx, kv_idx):
            keep = (q_idx >= kv_idx) & (roles[b, kv_idx] >= 0)
            return keep if role is None else keep & (roles[b, kv_idx] == role)
        return create_block_mask(allowed, batch, None, seq, seq, device=str(q.device))

    masks = [mask_of(None)] + [mask_of(role) for role in range(num_roles)]
    gqa = q.shape[2] != k.shape[2]

    lse_only = AuxRequest(lse=True)

    def run():
        out, aux = attend(qt, kt, vt, block_mask=masks[0], enable_gqa=gqa, return_aux=lse_only)
        role_lse = [attend(qt, kt, vt, block_mask=mask, enable_gqa=gqa, return_aux=lse_only)[1].lse
                    for mask in masks[1:]]
        mass = torch.stack([torch.exp(r - aux.lse) for r in role_lse], dim=-1)  # [B, H, S, R]
        return out.transpose(1, 2), mass

    return run


def _gpu_methods(q, k, v, roles):
    """name -> (forward callable returning tensors, whether it is differentiable)."""
    from megatron_avar.ops import role_attention_triton

    problem, _ = build_problem(q, k, v, roles, num_roles=NUM_ROLES)
    group = q.shape[2] // k.shape[2]
    # Separate leaves in SDPA's [B, H, S, D] layout, K/V expanded once outside the timed region.
    q_sdpa = q.detach().transpose(1, 2).requires_grad_()
    k_sdpa = k.detach().repeat_interleave(group, 2).transpose(1, 2).requires_grad_()
    v_sdpa = v.detach().repeat_interleave(group, 2).transpose(1, 2).requires_grad_()

    def sdpa(backend, gqa=False):
        from torch.nn.attention import sdpa_kernel

        keys, values = (k.transpose(1, 2), v.transpose(1, 2)) if gqa else (k_sdpa, v_sdpa)

        def run():
            with sdpa_kernel(backend):
                return (torch.nn.functional.scaled_dot_product_attention(q_sdpa, keys, values, is_causal=True,
                                                                         enable_gqa=gqa and group > 1),)
        return run

    spans = attention_spans(roles)  # once per batch, as RoleMassParams does

    from torch.nn.attention import SDPBackend

    # The probe's rows: PROBE_ROWS user-text queries (the third segment of make_inputs' layout), as AGTO reads.
    seq_len = q.shape[1]
    user_text = torch.arange(seq_len // 2, seq_len * 5 // 8, device=q.device)
    probe_rows = user_text[torch.linspace(0, user_text.numel() - 1, PROBE_ROWS, device=q.device).long()]

    # One context-parallel rank (of 2): its rows [S/2, B, Hq, D] and the whole row's keys / values [S, B, Hkv, D].
    split = ContextSplit.for_rank(seq_len, 2, 0, q.device)
    q_cp = q.detach().transpose(0, 1).index_select(0, split.positions).requires_grad_()
    k_cp, v_cp = (x.detach().transpose(0, 1).requires_grad_() for x in (k, v))

    def context_parallel_rank():
        return (local_rows_attention(q_cp, k_cp, v_cp, split, key_roles=roles, segment_ids=None,
                                     softmax_scale=q.shape[-1] ** -0.5),)

    return {
        "role_attention[triton]": lambda: role_attention_triton.triton_role_attention(problem, compute_mass=True),
        "triton, masses off": lambda: role_attention_triton.triton_role_attention(problem, compute_mass=False)[:1],
        "torch SDPA (flash)": sdpa(SDPBackend.FLASH_ATTENTION),
        "torch SDPA (cuDNN)": sdpa(SDPBackend.CUDNN_ATTENTION),
        "SDPA cuDNN, GQA": sdpa(SDPBackend.CUDNN_ATTENTION, gqa=True),
        "causal_attention[sdpa]": lambda: (causal_attention(q, k, v, roles, impl="sdpa", check_values=False,
                                                            spans=spans),),
        "FlexAttention, LSE/role": flex_role_attention(q, k, v, roles, NUM_ROLES),
        "CP rank of 2": context_parallel_rank,
        "eager + mass": lambda: reference_role_attention(problem, compute_dtype=q.dtype),
        f"role_mass probe ({PROBE_ROWS} rows)": lambda: (role_mass(q, k, roles, probe_rows, num_roles=NUM_ROLES,
                                                                   check_values=False),),
    }, (q_sdpa, k_sdpa, v_sdpa, q_cp, k_cp, v_cp)


TIMED_REGION_MS = 20  # calls back to back per timed region: at least this long, so launch overhead is amortised
MAX_CALLS_PER_REGION = 50


def _cuda_time_ms(fn, reps):
    """Median over ``reps`` timed regions of the time per call, each region a run of calls back to back between one
    pair of CUDA events (one call per region would time the host's launch overhead at short lengths: a kernel
    of 0.2 ms behind a Python wrapper of 0.4 ms reads as 0.4 ms)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, min(MAX_CALLS_PER_REGION, math.ceil(TIMED_REGION_MS / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def bench_gpu(seq_lens, reps, written=lambda rows, shape: None):
    """Rows of every method, length and mode; ``written(rows, shape)`` after each length (results are kept as
    they come: a run stopped at its time limit keeps the lengths it finished)."""
    from megatron_avar.ops.role_attention_triton import autotune_choices

    rows = []
    num_q_heads, num_kv_heads, head_dim, batch = 28, 4, 128, 1

    def shape():
        return dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, batch=batch,
                    dtype="bfloat16", causal=True, num_roles=NUM_ROLES, autotune_choices=autotune_choices())

    for seq_len in seq_lens:
        q, k, v, roles = make_inputs(batch, seq_len, num_q_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda")
        for t in (q, k, v):
            t.requires_grad_()
        try:  # block masks, compiled FlexAttention, the CP split: a failure costs this length, not the run
            methods, sdpa_inputs = _gpu_methods(q, k, v, roles)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            rows.append(dict(method="(setup)", seq_len=seq_len, mode="-", ms=None, tflops=None, peak_extra_mib=None,
                             note=f"failed: {str(exc)[:120]}"))
            written(rows, shape())
            continue
        with torch.no_grad():  # the timed kernels compute the same attention: largest |difference| of out
            ours = methods["role_attention[triton]"]()[0].float()
            flash = methods["torch SDPA (flash)"]()[0].transpose(1, 2).float()
            out_difference = (ours - flash).abs().max().item()
            del ours, flash
        for name, forward in methods.items():
            for mode in ("fwd", "fwd+bwd"):
                row = dict(method=name, seq_len=seq_len, mode=mode, out_max_abs_diff_triton_vs_flash=out_difference)
                try:
                    if mode == "fwd":
                        step = forward  # autograd graph built, as in training
                    else:
                        def step(forward=forward):
                            outs = forward()
                            torch.autograd.backward([o for o in outs if o.numel()],
                                                    [torch.ones_like(o) for o in outs if o.numel()])
                    step()  # compile / autotune
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    ms = _cuda_time_ms(step, reps)
                    flops = attention_flops(batch, num_q_heads, seq_len, head_dim, True, mode == "fwd+bwd")
                    if name.startswith("CP rank"):  # its two chunks hold half the row's causal work
                        flops /= 2
                    if name.startswith("role_mass"):  # Q K^T of its rows only: 2*N*Hq*keys*D, x4 with backward
                        keys_seen = seq_len * 9 // 16  # the rows sit at 1/2..5/8 of the sequence (causal)
                        flops = 2 * PROBE_ROWS * num_q_heads * keys_seen * head_dim * (4 if mode == "fwd+bwd" else 1)
                    row.update(ms=ms, tflops=flops / ms / 1e9,
                               peak_extra_mib=(torch.cuda.max_memory_allocated() - base) / 2**20)
                except torch.OutOfMemoryError:
                    row.update(ms=None, tflops=None, peak_extra_mib=None, note="OOM")
                except RuntimeError as exc:  # e.g. a backend that does not support this shape or GPU
                    row.update(ms=None, tflops=None, peak_extra_mib=None, note=f"failed: {str(exc)[:120]}")
                for t in (q, k, v, *sdpa_inputs):
                    t.grad = None
                torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
        written(rows, shape())
    return rows, shape()


# ----------------------------------------------------------------------------------------------------
# CPU part (each measurement in its own process, so peak RSS belongs to that measurement alone)

CPU_SHAPE = dict(batch=1, num_q_heads=7, num_kv_heads=1, head_dim=128)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_worker(impl, seq_len, mode, reps):
    q, k, v, roles = make_inputs(seq_len=seq_len, dtype=torch.float32, device="cpu", **CPU_SHAPE)
    for t in (q, k, v):
        t.requires_grad_(mode == "fwd+bwd")

    def attend(q, k, v, roles):
        if impl == "sdpa":  # the baseline users have: torch's causal attention, no masses
            group = q.shape[2] // k.shape[2]
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=group > 1)
            return (out,)
        return role_attention(q, k, v, roles, num_roles=NUM_ROLES, impl=impl)

    def step():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            outs = attend(q, k, v, roles)
            if mode == "fwd+bwd":
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    # Warm up on a short prefix in the same mode: loads libraries and autograd's one-time state.
    warm = [t[:, :64].detach().requires_grad_(mode == "fwd+bwd") for t in (q, k, v)]
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        outs = attend(*warm, roles[:, :64])
        if mode == "fwd+bwd":
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    del warm, outs
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    start = time.perf_counter()
    step()
    times = [time.perf_counter() - start]
    peak_extra_mib = (_status_kib("VmHWM") - rss_before) / 1024
    for _ in range(reps - 1):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # Best of N: other jobs share these 2 cores, and contention only ever adds time. The median is
    # kept too, to show how noisy the run was.
    ms = min(times) * 1e3
    flops = attention_flops(CPU_SHAPE["batch"], CPU_SHAPE["num_q_heads"], seq_len, CPU_SHAPE["head_dim"], True,
                            mode == "fwd+bwd")
    print(json.dumps(dict(method=impl, seq_len=seq_len, mode=mode, ms=ms, median_ms=statistics.median(times) * 1e3,
                          tflops=flops / ms / 1e9, peak_extra_mib=peak_extra_mib)))


def bench_cpu(seq_lens, reps):
    rows = []
    for seq_len in seq_lens:
        for impl in ("blockwise", "sdpa", "reference"):
            for mode in ("fwd", "fwd+bwd"):
                cmd = [sys.executable, __file__, "--cpu-worker", impl, str(seq_len), mode, "--reps", str(reps)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(row, flush=True)
    return rows, dict(CPU_SHAPE, dtype="float32", causal=True, num_roles=NUM_ROLES, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------------------------------
# Results


def _device_name(part):
    if part == "gpu":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 host_platform.processor() or "cpu")
    return f"{model} x{os.cpu_count()} cores"


def write_results(part, rows, shape, out_dir: Path, stem: Path | None = None) -> Path:
    """The Markdown + JSON of ``rows`` at ``stem`` (this run's files: picked by the first call, rewritten by the
    next ones)."""
    import triton

    now = datetime.datetime.now(datetime.UTC)
    device = _device_name(part)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")[:40]
    stem = stem or results_stem(out_dir, f"role_attention_{part}_{slug}_{now:%Y-%m-%d}")
    # CPU timings on a shared machine depend on what else runs: record the load next to them.
    meta = dict(date=now.isoformat(timespec="seconds"), device=device, commit=git_commit("megatron_avar/ops", __file__),
                torch=torch.__version__,
                load_average_1_5_15min=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                triton=triton.__version__, shape=shape,
                flop_formula="4*B*Hq*S^2*D forward, /2 causal; backward = 2.5x forward")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    baseline = "reference" if part == "cpu" else "torch SDPA (flash)"
    lines = [f"# role_attention benchmark ({part})", "",
             *(f"- {key}: {value}" for key, value in meta.items()), "",
             f"Time relative to the baseline `{baseline}` at the same length and mode. ms: "
             + ("best of the timed runs (median in brackets); peak extra: growth of peak RSS over RSS with inputs"
                if part == "cpu" else "median over the timed regions of the time per call (calls back to back, "
                ">= 20 ms per region); peak extra: torch.cuda peak over allocated before"),
             "", "| method | S | mode | ms | TFLOP/s | peak extra MiB | time vs baseline |",
             "|---|---:|---|---:|---:|---:|---:|"]
    base = {(r["seq_len"], r["mode"]): r["ms"] for r in rows if r["method"] == baseline}
    for r in rows:
        fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        ref = base.get((r["seq_len"], r["mode"]))
        ratio = f"{r['ms'] / ref:.2f}x" if r["ms"] and ref else r.get("note", "-")
        ms = fmt(r["ms"], ".1f") + (f" ({r['median_ms']:.1f})" if "median_ms" in r else "")
        lines.append(f"| {r['method']} | {r['seq_len']} | {r['mode']} | {ms} | "
                     f"{fmt(r['tflops'], '.3g')} | {fmt(r['peak_extra_mib'], '.0f')} | {ratio} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["auto", "gpu", "cpu"], default="auto",
                        help="gpu: Triton vs SDPA, FlexAttention and eager on CUDA; cpu: blockwise and SDPA vs "
                             "reference "
                             "(default: gpu if usable)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                        help="sequence lengths (default gpu: 1k..32k, cpu: 1k 2k 4k)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "tools" / "results")
    parser.add_argument("--cpu-worker", nargs=3, metavar=("IMPL", "S", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_worker:
        impl, seq_len, mode = args.cpu_worker
        return cpu_worker(impl, int(seq_len), mode, args.reps or 3)
    part = args.part
    if part == "auto":
        part = "gpu" if platform.cuda_available() and platform.triton_gpu_available() else "cpu"
    if part == "gpu":
        if not (platform.cuda_available() and platform.triton_gpu_available()):
            raise SystemExit("--part gpu needs CUDA and Triton's GPU backend (and TRITON_INTERPRET unset)")
        stems: list[Path] = []

        def written(rows, shape):
            stems[:] = [write_results(part, rows, shape, args.out_dir, stems[0] if stems else None)]

        rows, shape = bench_gpu(args.seq_lens or [1024, 2048, 4096, 8192, 16384, 32768], args.reps or 10, written)
        stem = stems[0]
    else:
        rows, shape = bench_cpu(args.seq_lens or [1024, 2048, 4096], args.reps or 3)
        stem = write_results(part, rows, shape, args.out_dir)
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
