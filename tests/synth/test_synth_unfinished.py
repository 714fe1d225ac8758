"""An unfinished `avar synth` output is refused by the data loader (`avar data validate`, `avar sft`, `avar grpo`
and a synthesis source all read data through `load_conversations`) until the same command has finished it.

Found in review: `avar synth` killed (SIGTERM) once its first shard existed left OUT/.synth_run.json and 3 of 8
shards in OUT/data, no manifest; `avar data validate OUT/data` then exited 0 with 9 of the 24 rows, and
`avar sft data.path=OUT/data` would have trained on them."""

from __future__ import annotations

import pytest

from megatron_avar.cli import main
from megatron_avar.data.conversations import load_conversations
from megatron_avar.synth import stages
from megatron_avar.synth.output_dir import RUN_RECORD
from megatron_avar.synth.pipeline import MANIFEST
from synth_helpers import shard_rows, synth_overrides


class Killed(BaseException):
    """The run's process ending at once, as on SIGTERM or SIGKILL: no handler of the pipeline runs."""


def test_a_run_killed_after_its_first_shard_is_refused_by_the_loader_until_resumed(
        tmp_path, procedural_source, teacher, monkeypatch, capsys):
    data, out = procedural_source[0], tmp_path / "run"
    args = synth_overrides(tmp_path, data, teacher)  # run.batch_records=3: 8 records in 3 shards
    write_rows = stages.write_rows

    def write_one_shard_then_die(*a, **kw):
        write_rows(*a, **kw)
        raise Killed

    monkeypatch.setattr(stages, "write_rows", write_one_shard_then_die)
    with pytest.raises(Killed):
        main(["synth", *args])
    monkeypatch.undo()
    assert (out / RUN_RECORD).is_file() and not (out / MANIFEST).exists()
    assert shard_rows(out / "data") == 3  # one whole shard: a dataset that would load, 3 of its 8 records

    capsys.readouterr()
    assert main(["data", "validate", str(out / "data")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"invalid dataset: {out / 'data'} is part of an unfinished "
                                                  f"`avar synth` run (output.dir {out} holds {RUN_RECORD} and no "
                                                  f"{MANIFEST}")
    assert error.endswith("rerun the same `avar synth` command (same config) to resume and finish it (cached teacher "
                          f"answers are reused), then load {out / 'data'}")
    shard = next((out / "data").glob("shard-*.parquet"))
    for path in (out, shard):  # the output folder itself, one shard of it
        with pytest.raises(ValueError, match="is part of an unfinished `avar synth` run"):
            load_conversations(path)

    # The same command resumes it; finished, it loads whole.
    assert main(["synth", *args]) == 0
    assert not (out / RUN_RECORD).exists()
    assert len(load_conversations(out / "data")) == 8


def test_a_finished_run_killed_before_it_removed_its_record_loads(tmp_path, procedural_source, teacher):
    """The manifest is written before the record is removed: a kill between the two leaves a finished run."""
    out = tmp_path / "run"
    assert main(["synth", *synth_overrides(tmp_path, procedural_source[0], teacher)]) == 0
    (out / RUN_RECORD).write_text("{}")
    assert len(load_conversations(out / "data")) == 8
