"""tools/bench_sft.py's reading of its measurements: rounds merged into one row per (length, mode), the ratios
and the noise columns taken from every round's steps."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_sft  # noqa: E402


def _measured(mode, rnd, steps, peak, probe=None):
    return {"mode": mode, "seq_length": 512, "round": rnd, "step_seconds": sorted(steps)[len(steps) // 2],
            "step_seconds_all": steps, "tflops": 1.0 / sorted(steps)[len(steps) // 2], "peak_memory_gb": peak,
            "real_tokens": 400, "attention_share": 0.1, "layers": 2, "heads": 2, "planned_peak_gb": None,
            "probe_seconds": probe, "profiled_step_seconds": None if probe is None else 10.0}


def test_rounds_merge_into_one_row_per_mode_with_ratios_over_every_rounds_steps():
    results = [_measured("off", 0, [10.0, 12.0, 11.0], 2.0), _measured("probe", 0, [10.5, 14.0, 11.0], 2.1, 0.05),
               _measured("off", 1, [9.0, 10.0, 13.0], 2.2),
               {"mode": "probe", "seq_length": 512, "round": 1, "error": "exit 1: RuntimeError"},
               _measured("probe", 2, [10.0, 12.5, 9.5], 2.0, 0.03)]
    args = argparse.Namespace(seq_lens=[512], modes=["off", "probe"])
    off, probe = bench_sft.table(results, args, peak_tflops=None)
    assert off["step_seconds"] == 10.5 and off["step_seconds_min"] == 9.0  # median / min of all six steps
    assert off["spread"] == pytest.approx((13.0 - 9.0) / 10.5)
    assert off["peak_memory_gb"] == 2.2 and off["rounds"] == 2 and off["rounds_failed"] == 0
    assert off["tflops"] == pytest.approx(1.0 / 10.5)  # the first round's FLOPs over the merged median
    assert probe["step_seconds"] == pytest.approx(10.75) and probe["step_seconds_min"] == 9.5
    assert probe["rounds"] == 2 and probe["rounds_failed"] == 1  # the failed round is counted, not averaged
    assert probe["step_time_overhead"] == pytest.approx(10.75 / 10.5 - 1)
    assert probe["min_step_time_overhead"] == pytest.approx(9.5 / 9.0 - 1)
    assert probe["probe_share"] == pytest.approx(0.004)  # median of 0.005 and 0.003
    text = bench_sft.markdown([off, probe], {"hardware": "cpu", "date": "d", "commit": "c", "model": "m",
                                             "precision": "fp32", "steps": 3, "warmup": 1, "rounds": 3})
    assert "median of 3 interleaved rounds x 3 steps" in text
    assert "| 512 | probe | 10.750 | +2.4% | 9.500 | +5.6% | — | 42% | 0.40% |" in text
    assert "Rounds not run or failed (their rows use the rounds that measured): 512 probe: 1" in text


def test_a_mode_no_round_measured_keeps_its_error():
    results = [_measured("off", 0, [1.0], 1.0), {"mode": "probe", "seq_length": 512, "round": 0, "error": "OOM"}]
    rows = bench_sft.table(results, argparse.Namespace(seq_lens=[512], modes=["off", "probe"]), peak_tflops=None)
    assert rows[1]["error"] == "OOM" and "step_seconds" not in rows[1]
    assert "| 512 | probe | OOM |" in bench_sft.markdown(rows, {"hardware": "cpu", "date": "d", "commit": "c",
                                                                  "model": "m", "precision": "fp32", "steps": 1,
                                                                  "warmup": 0, "rounds": 1})


def test_profile_reads_the_probes_autograd_functions_by_their_names():
    import importlib

    role_mass = importlib.import_module("megatron_avar.ops.role_mass")  # (the package exports the function)
    role_mass_triton = importlib.import_module("megatron_avar.ops.role_mass_triton")
    assert bench_sft.PROBE_FUNCTIONS == (role_mass._BlockwiseRoleMass.__name__,
                                         role_mass_triton._TritonRoleMass.__name__)


def test_paired_rounds_give_the_median_ratio_of_steps_on_the_same_batch():
    # --paired: off and probe from one process, step i of both on the same batch; no CPU peak memory (one RSS)
    results = [{**_measured("off", 0, [10.0, 20.0, 10.0], None), "paired_with": ["probe"]},
               {**_measured("probe", 0, [11.0, 20.0, 10.5], None, 0.01), "paired_with": ["off"]},
               {**_measured("off", 1, [30.0], None), "paired_with": ["probe"]},
               {**_measured("probe", 1, [30.3], None, 0.01), "paired_with": ["off"]}]
    off, probe = bench_sft.table(results, argparse.Namespace(seq_lens=[512], modes=["off", "probe"]),
                                 peak_tflops=None)
    # ratios 1.1, 1.0, 1.05, 1.01: their median, not the ratio of the two medians (10.5/10.75 ... from other steps)
    assert probe["paired_ratio"] == pytest.approx(1.03)
    assert off["paired_ratio"] is None  # the baseline has no ratio to itself
    assert probe["peak_memory_gb"] is None and "extra_memory_gb" not in probe
    text = bench_sft.markdown([off, probe], {"hardware": "cpu", "date": "d", "commit": "c", "model": "m",
                                             "precision": "fp32", "steps": 3, "warmup": 1, "rounds": 2})
    # off: the baseline in the paired column, no probe share, no peak; probe: its paired ratio, no peak
    assert "| 512 | off | 15.000 | baseline | 10.000 | baseline | baseline | 133% | — | — |" in text
    assert "| 512 | probe | 15.500 | +3.3% | 10.500 | +5.0% | +3.0% | 128% | 0.10% | — |" in text


def test_a_round_paired_with_a_failed_off_has_no_ratio():
    results = [{"mode": "off", "seq_length": 512, "round": 0, "error": "OOM"},
               {**_measured("probe", 0, [11.0], None), "paired_with": ["off"]},
               _measured("off", 1, [10.0], 2.0), _measured("probe", 1, [12.0], 2.0)]  # unpaired: no ratio either
    assert bench_sft.paired_ratio(results, 512, "probe") is None


def test_timed_steps_alternate_the_order_and_a_failing_paired_mode_leaves_the_other_measured():
    calls = []

    def step(mode, fail_at=None):
        def run(batch):
            calls.append((mode, batch))
            if batch == fail_at:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run

    timed = bench_sft.timed_steps({"off": step("off"), "probe": step("probe", fail_at=2)}, iter(range(10)),
                                  warmup=1, steps=3)
    # each batch in both modes, the first mode alternating; probe left out after its step raised
    assert calls == [("off", 0), ("probe", 0), ("probe", 1), ("off", 1), ("off", 2), ("probe", 2), ("off", 3)]
    assert timed.failed == {"probe": "OOM"} and timed.batches == [1, 2, 3]
    assert len(timed.seconds["off"]) == 3 and len(timed.seconds["probe"]) == 1  # warm-up steps not timed
    with pytest.raises(RuntimeError, match="out of memory"):  # one mode, or the last one left: the worker fails
        bench_sft.timed_steps({"off": step("off", fail_at=0)}, iter(range(10)), warmup=0, steps=1)
