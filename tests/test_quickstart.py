"""`avar quickstart` end to end (what `make quickstart` runs), shortened: the AVAR run raises VAS on
held-out samples more than the α=β=0 run of the same data and seed, and summary.json holds every number the
README promises. Seeded and deterministic on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_quickstart_avar_raises_vas_more_than_plain_sft(tmp_path, capsys):
    out = tmp_path / "quickstart"
    command = [sys.executable, "-m", "megatron_avar", "quickstart", "--out", str(out), "--num-samples", "16",
               "--vas-samples", "4", "train.steps=5", "data.seq_length=512", "checkpoint.interval=0"]
    result = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=900,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"vas_before", "vas_after", "vas_after_baseline", "final_lm_loss",
                            "final_lm_loss_baseline", "hf_export_dir"}
    assert summary["vas_after"] - summary["vas_before"] > 2 * abs(summary["vas_after_baseline"] - summary["vas_before"])
    assert summary["vas_after"] > summary["vas_after_baseline"]
    assert (Path(summary["hf_export_dir"]) / "config.json").is_file()
    assert (out / "vas-compare" / "compare.md").is_file()
    # GRPO from the AVAR SFT model: every step logged with its reward parts and the rollouts' r_visual, and
    # (the visual term on every rollout) rewards that differ within groups, so the policy is really updated.
    curve = summary["grpo"]
    assert [h["step"] for h in curve] == list(range(6))
    assert all(h["reward/r_visual"] > 0 and 0 <= h["reward/accuracy"] <= 1 for h in curve)
    assert all(h["reward/total"] > 0 and h["optim/grad_norm"] > 0 for h in curve)
    # A second quickstart refuses to clobber the run without --overwrite (the command line's entry point, here).
    from megatron_avar.cli import main

    assert main(command[3:]) == 2 and "--overwrite" in capsys.readouterr().err


def test_a_bad_override_or_out_is_refused_before_anything_is_written(tmp_path, capsys):
    from megatron_avar.cli import main

    out = tmp_path / "quickstart"
    assert main(["quickstart", "--out", str(out), "train.stepz=1"]) == 2
    assert "unknown config key(s) train.stepz" in capsys.readouterr().err and not out.exists()
    (tmp_path / "file").write_text("mine")
    assert main(["quickstart", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
    # An earlier quickstart is kept when --overwrite comes with a count or a rank number the stages refuse (before:
    # deleted, then the held-out data failed without naming the flag, or sft failed after four stages had run).
    from megatron_avar.quickstart import MARKER

    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "summary.json").write_text("earlier")
    for flags, message in ((["--vas-samples", "0"], "--vas-samples must be >= 1, got 0"),
                           (["--num-samples", "-1"], "--num-samples must be >= 1, got -1"),
                           (["--nproc", "3"], "train.global_batch_size (2) does not split over the 3 data-parallel "
                                              "ranks of --nproc 3"),
                           (["--nproc", "4", "data.micro_batch_size=2"], "SFT stages' train.global_batch_size (2) does "
                            "not split over the 2 data-parallel ranks x data.micro_batch_size 2 of --nproc 4"),
                           (["--nproc", "6", "train.global_batch_size=6"], "GRPO stages' train.prompts_per_step (2) "
                            "does not split over the 3 data-parallel ranks of --nproc 6")):
        assert main(["quickstart", "--out", str(out), "--overwrite", *flags]) == 2
        assert message in capsys.readouterr().err
        assert (out / "summary.json").read_text() == "earlier", flags
