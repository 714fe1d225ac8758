"""tools/results_meta.py: a benchmark run on the same day as an earlier one writes beside it, never over it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from results_meta import results_stem  # noqa: E402


def test_a_second_run_gets_its_own_name(tmp_path):
    out = tmp_path / "results"
    first = results_stem(out, "bench_sft_cpu_2026-12-05")
    assert first == out / "bench_sft_cpu_2026-12-05" and out.is_dir()
    first.with_suffix(".json").write_text("{}")
    first.with_suffix(".md").write_text("first")
    second = results_stem(out, "bench_sft_cpu_2026-12-05")
    assert second.name == "bench_sft_cpu_2026-12-05-2"
    second.with_suffix(".md").write_text("second")  # a run stopped before its .json still holds the name
    assert results_stem(out, "bench_sft_cpu_2026-12-05").name == "bench_sft_cpu_2026-12-05-3"
    assert first.with_suffix(".md").read_text() == "first"
    assert results_stem(out, "bench_sft_cpu_2026-12-06") == out / "bench_sft_cpu_2026-12-06"
