"""Fault injection (issue 16) on `avar sft` run directories, through the real command line: what reaches the
disk after a fault, and what a user sees.

- a non-finite update (avar.alpha=1e30: a valid weight whose update overflows) stops the run before it is
  logged or saved: the last good checkpoint stays `latest`, the error names the step and its samples (before:
  the NaN weights were saved as `latest`); a NaN weight is refused by config validation;
- a non-finite learning rate is refused by config validation;
- the same command on a finished run does nothing (before: metrics.jsonl repeated steps, summary.json was
  overwritten with steps_run 0);
- checkpoint.resume=false over an earlier run's checkpoints is refused, and replaces them only with
  checkpoint.overwrite=true (before: the runs mixed and pruning by step number deleted the new checkpoints);
- a resume that changes the schedule is refused by name (before: the restored scheduler silently kept the old
  learning rate and horizon while config.json recorded the new ones);
- resuming never unpickles code planted in a checkpoint: the per-rank RNG state is safetensors, a pickle where
  the old rank_state/*.pt was is refused (legacy) or ignored, and megatron's pickled parts (.metadata, the
  byte items in *.distcp, common.pt) are vetted before megatron reads them (before: os.system ran on resume);
- a step's rows that fail to render on one data-parallel rank stop both ranks with one line each, the other
  rank's naming the failed rank and its error (before: a traceback of the lost connection, or under NCCL a wait).

One 2-step run (a checkpoint after each step) is made once; each test works on a copy of it.
"""

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from fault_runs import copy_run as _copy_run
from fault_runs import logged_steps as _steps
from fault_runs import output as _output
from fault_runs import run_sft as _sft


# -- 1. non-finite updates ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("optim.lr", ".inf", r"optim\.lr must be a finite number, got inf"),
    ("optim.lr", ".nan", r"optim\.lr must be a finite number, got nan"),
    ("optim.lr", "0", r"optim\.lr must be a finite number > 0, got 0"),
    ("optim.adam_beta2", "1.0", r"optim\.adam_beta1 and optim\.adam_beta2 must be in \[0, 1\)"),
    ("optim.adam_eps", "0", r"optim\.adam_eps > 0"),
])
def test_sft_config_refuses_a_nonfinite_or_degenerate_optimizer_setting(field, value, message):
    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig

    with pytest.raises(ValueError, match=message):
        load_config(SFTConfig, None, ["out=o", "model.hf_path=m", "data.path=d", f"{field}={value}"])


def test_a_nonfinite_update_is_never_saved_and_the_last_good_checkpoint_stays_latest(base_run, sft_inputs,
                                                                                      tmp_path):
    run = _copy_run(base_run, tmp_path / "run", latest_step=0)  # preempted after step 0; metrics has 0 and 1
    done = _sft(run, sft_inputs, **{"avar.alpha": "1e30"})  # finite, valid, and the update overflows
    output = _output(done)
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    error = output[output.index("avar sft: error: "):]
    assert error.startswith("avar sft: error: step 1: the update is not finite (")
    assert "optim/grad_norm = inf" in error and "Lower optim.lr (or avar.alpha" in error
    dataset_ids = {json.loads(line)["id"] for line in Path(sft_inputs["data_path"]).read_text().splitlines()}
    named = re.search(r"Samples of this step: (.*?)\. Lower", error).group(1).split(", ")
    assert named and set(named) <= dataset_ids
    assert f"{run / 'checkpoints' / 'step_00000000'} stays the latest checkpoint" in error
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000000"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000000"]  # no step 1, no partial
    assert _steps(run) == [0]  # the NaN step is not logged; step 1 of the earlier session was trimmed on resume
    failed = json.loads((run / "summary.json").read_text())  # not the earlier session's, stopped after step 0
    assert failed["failed"].startswith("NonFiniteUpdateError: step 1: the update is not finite (")
    assert (failed["last_step"], failed["stopped_by"], failed["steps_run"]) == (None, None, 0)


def _step_with_a_poisoned_output_norm(overrides) -> str:
    """One SFT step whose final norm weight is infinite (every micro-batch's LM loss NaN): the error it raises."""
    from megatron.core import parallel_state

    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.sft.trainer import build_run, train_step
    from megatron_avar.training.megatron_setup import init_distributed
    from megatron_avar.training.run_loop import NonFiniteUpdateError

    config = load_config(SFTConfig, None, overrides)
    layout = init_distributed(1, 1, seed=config.train.seed)
    run = build_run(config, layout)
    with torch.no_grad():
        run.model.modules[0].language_model.decoder.final_layernorm.weight.fill_(float("inf"))
    try:
        train_step(run.model, next(iter(run.data)), config, avar_layers=run.avar_layers, layout=layout)
    except NonFiniteUpdateError as error:
        return str(error)
    finally:
        parallel_state.destroy_model_parallel()
    return "no error"


def test_samples_whose_lm_loss_is_not_finite_are_named(sft_inputs, tmp_path):
    """The losses are checked once after the schedule (not read per micro-batch), still naming the samples."""
    from megatron_avar.testing import run_on_ranks
    from sft_cases import sft_overrides

    error = run_on_ranks(_step_with_a_poisoned_output_norm, 1, sft_overrides(sft_inputs, tmp_path / "run"),
                         timeout_s=300)[0]
    assert error.startswith("step 0: the update is not finite (")
    named = re.search(r"the LM loss is not finite in samples (.*?)\. Samples of this step: (.*?)\. Lower", error)
    assert named, error
    assert named.group(1).split(", ") == named.group(2).split(", ")  # every micro-batch's loss: all its samples


# -- 4. rerun of a finished run -------------------------------------------------------------------------------
def test_rerunning_a_finished_run_changes_nothing(base_run, sft_inputs, tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "summary.json", "config.json")}
    done = _sft(run, sft_inputs)
    assert done.returncode == 0, _output(done)[-3000:]
    assert "holds a finished run: all 2 steps ran (checkpoint step_00000001); nothing to do" in done.stdout
    assert {name: (run / name).read_bytes() for name in before} == before
    assert _steps(run) == [0, 1] and json.loads(before["summary.json"])["steps_run"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"


# -- 2. resume=false over an earlier run ----------------------------------------------------------------------
def test_resume_false_over_earlier_checkpoints_is_refused_and_replaces_them_only_with_consent(base_run, sft_inputs,
                                                                                            tmp_path):
    run = _copy_run(base_run, tmp_path / "run")
    done = _sft(run, sft_inputs, **{"checkpoint.resume": "false", "train.steps": 1})
    assert done.returncode == 2, _output(done)[-3000:]
    assert f"avar sft: error: {run} holds checkpoints of an earlier run" in done.stderr
    for way_out in ("drop checkpoint.resume=false", "checkpoint.overwrite=true", "another out"):
        assert way_out in done.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000000", "step_00000001"]
    assert _steps(run) == [0, 1]

    done = _sft(run, sft_inputs, **{"checkpoint.resume": "false", "checkpoint.overwrite": "true", "train.steps": 1})
    assert done.returncode == 0, _output(done)[-3000:]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000000"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000000"
    state = json.loads((checkpoints / "step_00000000" / "trainer_state.json").read_text())
    assert state["schedule"]["train.steps"] == 1  # the new run's checkpoint, not the old one
    assert _steps(run) == [0] and json.loads((run / "summary.json").read_text())["steps_run"] == 1


def test_starting_over_removes_only_what_runs_wrote(tmp_path):
    """checkpoint.overwrite=true in an out shared with other tools: their checkpoints and event logs stay (before:
    <out>/checkpoints and <out>/tensorboard were deleted whole)."""
    from megatron_avar.training.run_loop import RunStart, prepare_run_dir

    out = tmp_path / "run"
    ours = [out / "checkpoints" / "step_00000003" / "trainer_state.json", out / "checkpoints" / "latest",
            out / "checkpoints" / ".step_00000004.partial" / "x", out / "tensorboard" / "events.out.tfevents.1.host",
            out / "metrics.jsonl", out / "summary.json"]
    theirs = [out / "checkpoints" / "other_project" / "model.ckpt", out / "tensorboard" / "other" / "events",
              out / "notes.txt"]
    for file in ours + theirs:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("x")
    prepare_run_dir(out, RunStart(resume_from=None, start_step=0, replace_earlier=True), {"out": str(out)})
    assert all(file.read_text() == "x" for file in theirs)
    assert not any(file.exists() for file in ours)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["other_project"]
    just_ours = tmp_path / "alone"
    (just_ours / "checkpoints" / "step_00000000").mkdir(parents=True)
    (just_ours / "tensorboard").mkdir()
    (just_ours / "tensorboard" / "events.out.tfevents.2.host").write_text("x")
    prepare_run_dir(just_ours, RunStart(resume_from=None, start_step=0, replace_earlier=True), {})
    assert sorted(p.name for p in just_ours.iterdir()) == ["config.json"]


def test_overwrite_without_resume_false_is_refused_by_config():
    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig

    with pytest.raises(ValueError, match=r"checkpoint\.overwrite=true starts the run over.*checkpoint\.resume=false"):
        load_config(SFTConfig, None, ["out=o", "model.hf_path=m", "data.path=d", "checkpoint.overwrite=true"])


# -- 3. schedule changed on resume ----------------------------------------------------------------------------
def test_a_resume_that_changes_the_schedule_is_refused_by_name(base_run, sft_inputs, tmp_path):
    run = _copy_run(base_run, tmp_path / "run", latest_step=0)
    config_before = (run / "config.json").read_bytes()
    done = _sft(run, sft_inputs, **{"optim.lr": 2e-3, "train.steps": 4})
    assert done.returncode == 2, _output(done)[-3000:]
    assert f"avar sft: error: {run} resumes from step_00000000, whose schedule differs" in done.stderr
    assert "optim.lr: 0.001 in the checkpoint, 0.002 now" in done.stderr
    assert "train.steps: 2 in the checkpoint, 4 now" in done.stderr
    assert "set the old values to resume" in done.stderr
    assert (run / "config.json").read_bytes() == config_before  # the config on disk still describes the run


def test_a_resume_with_another_model_is_refused_by_name(base_run, sft_inputs, tmp_path):
    """Found in review: a model with another layer count read as other gradient buckets (the error advised the
    bucket settings the run already had), and without the distributed optimizer megatron's load failed with a
    traceback of a shape mismatch."""
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    run = _copy_run(base_run, tmp_path / "run", latest_step=0)
    config_before = (run / "config.json").read_bytes()
    deeper = write_toy_checkpoint(tmp_path / "deeper", ToyModelConfig(num_layers=3))
    done = _sft(run, {**sft_inputs, "hf_path": str(deeper)})
    assert done.returncode == 2 and "Traceback" not in _output(done), _output(done)[-3000:]
    assert (f"avar sft: error: {run / 'checkpoints' / 'step_00000000'} was trained from another model than "
            f"model.hf_path={deeper} (text.num_layers: 2 in the checkpoint, 3 in model.hf_path)") in done.stderr
    assert (run / "config.json").read_bytes() == config_before


# -- 5. planted pickles ---------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, payload, *, plain_pickle: bool = False) -> None:
    path.unlink(missing_ok=True)  # a new file: never write through a hard link into the base run
    if plain_pickle:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)


def test_a_pickle_planted_as_rank_state_is_refused_on_resume_and_never_runs(base_run, sft_inputs, tmp_path):
    run = _copy_run(base_run, tmp_path / "run", latest_step=0)
    marker = tmp_path / "pwned"
    rank_state = run / "checkpoints" / "step_00000000" / "rank_state"
    (rank_state / "00000.safetensors").unlink(missing_ok=True)  # the old layout, as a crafted checkpoint has
    _plant(rank_state / "00000.pt", {"torch": _Payload(marker), "tracker": {}})
    done = _sft(run, sft_inputs)
    assert done.returncode == 2, _output(done)[-3000:]
    assert f"avar sft: error: {rank_state / '00000.pt'} is refused" in done.stderr
    assert "Traceback" not in _output(done) and not marker.exists()


def test_rank_state_is_safetensors_and_a_pickle_beside_it_is_never_read(base_run, tmp_path):
    from megatron_avar.training.checkpointing import _read_rank_state

    step = _copy_run(base_run, tmp_path / "run") / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in (step / "rank_state").iterdir()) == ["00000.safetensors"]
    marker = tmp_path / "pwned"
    _plant(step / "rank_state" / "00000.pt", {"torch": _Payload(marker), "tracker": {}})
    state = _read_rank_state(step, 0)
    assert state["torch"].dtype == torch.uint8 and any(name.startswith("tracker/") for name in state)
    assert not marker.exists()
    # a pickle in place of the safetensors file is not a safetensors file
    _plant(step / "rank_state" / "00000.safetensors", _Payload(marker), plain_pickle=True)
    with pytest.raises(ValueError, match=r"00000\.safetensors is not a safetensors file of RNG states"):
        _read_rank_state(step, 0)
    assert not marker.exists()


def test_megatrons_pickled_parts_are_vetted_before_megatron_reads_them(base_run, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_avar.checkpoint_vetting import vet_dist_checkpoint

    marker = tmp_path / "pwned"
    step = _copy_run(base_run, tmp_path / "run") / "checkpoints" / "step_00000001"
    vet_dist_checkpoint(step)  # what avar writes passes
    metadata = pickle.loads((step / ".metadata").read_bytes())

    # .metadata itself: megatron (torch.distributed.checkpoint) reads it with plain pickle.load
    original = (step / ".metadata").read_bytes()
    _plant(step / ".metadata", {"metadata": _Payload(marker)}, plain_pickle=True)
    with pytest.raises(ValueError, match=r"\.metadata is refused \(it names posix\.system"):
        vet_dist_checkpoint(step)
    (step / ".metadata").write_bytes(original)

    # a byte item (read by torch's load planner with torch.load(weights_only=False)) pointing at a planted blob
    item = next(index for index, info in metadata.storage_data.items()
                if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata))
    _plant(step / "__9_0.distcp", [_Payload(marker)])
    blob_length = (step / "__9_0.distcp").stat().st_size
    metadata.storage_data[item] = _StorageInfo(relative_path="__9_0.distcp", offset=0, length=blob_length)
    _plant(step / ".metadata", metadata, plain_pickle=True)
    with pytest.raises(ValueError, match=rf"__9_0\.distcp is refused \(item {re.escape(item.fqn)}"):
        vet_dist_checkpoint(step)
    (step / ".metadata").write_bytes(original)

    # found in review: a .metadata whose storage_meta is not one (torch's reader then fails, and its fallback reads
    # rank-local __<rank>.metadata with plain pickle), and such a rank-local file itself
    metadata.storage_meta = torch.Size([])
    _plant(step / ".metadata", metadata, plain_pickle=True)
    with pytest.raises(ValueError, match=r"\.metadata is refused .*storage_meta is a Size"):
        vet_dist_checkpoint(step)
    (step / ".metadata").write_bytes(original)
    _plant(step / "__0.metadata", {"metadata": _Payload(marker)}, plain_pickle=True)
    with pytest.raises(ValueError, match=r"holds \['__0\.metadata'\], rank-local metadata megatron never writes"):
        vet_dist_checkpoint(step)
    (step / "__0.metadata").unlink()

    # common.pt (torch.load with torch's default)
    _plant(step / "common.pt", {"optimizer": _Payload(marker)})
    with pytest.raises(ValueError, match=r"common\.pt is refused"):
        vet_dist_checkpoint(step)
    assert not marker.exists()


# -- one data-parallel rank's rows fail to render ---------------------------------------------------------------

_RANK_1_READ_FAILS = '''
import errno, os, sys
if os.environ.get("RANK") == "1":
    import megatron_avar.roles as roles
    _render = roles.render_conversation
    def _render_fails_in_a_step(*args, **kwargs):
        if sys._getframe(1).f_code.co_name == "__getitem__":  # a step's row, not the plan's counting
            raise OSError(errno.EIO, os.strerror(errno.EIO), "/data/images/q7.png")
        return _render(*args, **kwargs)
    roles.render_conversation = _render_fails_in_a_step
'''


def test_rows_failing_to_render_on_one_rank_stop_both_ranks_naming_the_cause(sft_inputs, tmp_path):
    from fault_runs import sft_command, two_ranks

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_RANK_1_READ_FAILS)  # rank 1's disk fails under a step's image
    run = tmp_path / "run"
    done = two_ranks(sft_command(run, sft_inputs, **{"checkpoint.interval": 0}),
                     env={"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])})
    # before: rank 0 died in the step's all-reduce, a traceback of gloo's lost connection (NCCL: a wait)
    assert [code for code, _ in done] == [2, 2], done
    (_, output_0), (_, output_1) = done
    assert "cannot be rendered ([Errno 5] Input/output error: '/data/images/q7.png')" in output_1
    assert "avar sft: error: step 0: rendering this step's rows failed on rank 1 (its error: ValueError: " in output_0
    assert "Input/output error" in output_0 and "Traceback" not in output_0
    assert not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text() == ""
    assert "rendering this step's rows failed on rank 1" in json.loads((run / "summary.json").read_text())["failed"]
