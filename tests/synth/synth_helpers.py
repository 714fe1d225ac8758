"""Configs for the synthesis tests: every teacher at the fake server, fast retries, local executor."""

from __future__ import annotations

from pathlib import Path

from megatron_avar.config import load_config
from megatron_avar.synth.config import SynthConfig
from synth_fake_teacher import FakeTeacher

# Fast client settings: retries with millisecond backoff, a short timeout for the "timeout" fault.
FAST_CLIENT = ["client.timeout_s=5", "client.backoff_initial_s=0.01", "client.backoff_max_s=0.05",
               "client.max_retries=3", "client.concurrency=4"]


def synth_overrides(tmp_path: Path, data: Path, teacher: FakeTeacher, *overrides: str, name: str = "run") -> list[str]:
    """The `avar synth` KEY=VALUE arguments of ``synth_config`` (later overrides win)."""
    base = [f"sources=[{{name: proc, path: '{data}'}}]", f"output.dir='{tmp_path / name}'",
            f"run.work_dir='{tmp_path / 'work'}'",
            "run.executor=local", "run.batch_records=3", "run.progress_interval_s=60", *FAST_CLIENT]
    base += [f"{stage}.teacher.base_url={teacher.base_url}" for stage in ("describe", "reason", "anchor")]
    return [*base, *overrides]


def synth_config(tmp_path: Path, data: Path, teacher: FakeTeacher, *overrides: str, name: str = "run"):
    """A config reading ``data`` with all teachers at ``teacher``, output in tmp_path/<name>,
    request cache shared by all runs of a test (tmp_path/work)."""
    return load_config(SynthConfig, None, synth_overrides(tmp_path, data, teacher, *overrides, name=name))
