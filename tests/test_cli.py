"""The `avar` command: help lists the subcommands; data generate + validate end to end; clean errors."""

import json
import subprocess
import sys

import pytest

from megatron_avar.cli import main


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "megatron_avar", "--help"], capture_output=True, text=True,
                            check=True)
    assert "data" in result.stdout and "SUBCOMMAND" in result.stdout


def test_a_subcommand_without_its_command_shows_its_own_help(capsys):
    assert main(["convert"]) == 2
    shown = capsys.readouterr().err
    assert shown.startswith("usage: avar convert") and "hf-to-mcore" in shown and "quickstart" not in shown


def test_generate_then_validate(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["data", "generate", "--out", str(out), "--num-samples", "4", "--image-size", "112", "84"]) == 0
    assert len((out / "data.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main(["data", "validate", str(out), "--max-pixels", str(28 * 28 * 64)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 4 and summary["images"] == 4 and summary["with_answer"] == 4
    assert summary["image_tokens"] >= 4 and summary["tokens_min"] > 20
    assert main(["data", "validate", str(out), "--max-length", "10", "--max-pixels", str(28 * 28 * 64)]) == 1
    # token counts as training counts them: <think>/<answer> single tokens by default (data.reasoning_tokens)
    from megatron_avar.data.conversations import load_conversations
    from megatron_avar.processor import load_processor
    from megatron_avar.training.sample_plan import compute_sample_stats

    capsys.readouterr()
    processor = load_processor(None, max_pixels=28 * 28 * 64, reasoning_tokens=True)
    stats = compute_sample_stats(load_conversations(out), processor, seq_length=4096, truncate=False)
    assert main(["data", "validate", str(out), "--max-pixels", str(28 * 28 * 64), "--max-length",
                 str(max(stats.full_lengths))]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_max"] == max(stats.full_lengths)
    assert main(["data", "validate", str(out), "--max-pixels", str(28 * 28 * 64), "--no-reasoning-tokens"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_max"] > max(stats.full_lengths)


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["data", "generate", "--out", str(out), "--num-samples", "2"]) == 0
    assert main(["data", "generate", "--out", str(out), "--num-samples", "2"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["data", "generate", "--out", str(tmp_path / "x"), "--kinds", "count_colour,unicorns"]) == 2
    assert "unknown kind(s) ['unicorns']" in capsys.readouterr().err
    for length in ("0", "-1"):  # found in review: accepted, every record then "too long"
        assert main(["data", "validate", str(out), "--max-length", length]) == 2
        assert f"--max-length {length}: give a number of tokens >= 1" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "messages": [], "answer": "1"}\n')
    assert main(["data", "validate", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl line 1" in capsys.readouterr().err


def test_a_file_system_error_is_one_line(tmp_path, capsys):
    """Found in review: only FileNotFoundError was caught, so a path under a file, an unwritable folder or a full
    disk printed a traceback (here: `--out` below a file)."""
    (tmp_path / "afile").write_text("")
    assert main(["data", "generate", "--out", str(tmp_path / "afile" / "sub"), "--num-samples", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avar data: error: ") and str(tmp_path / "afile") in err and "Traceback" not in err


def test_overrides_may_come_on_both_sides_of_a_flag(capsys):
    """Found in review: `avar plan a=1 --model 7b b=2` failed with the top-level usage, "unrecognized arguments:
    b=2", as if the key were unknown; argparse takes one run of a positional list."""
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[1] / "examples" / "sft" / "avar_7b.yaml")
    assert main(["plan", "--config", config, "data.seq_length=4096", "--model", "7b", "train.recompute=full"]) == 0
    assert "4096 tokens" in capsys.readouterr().out
    sweep = str(Path(config).parents[1] / "sweeps" / "tiny_cpu.yaml")  # (its positional list holds `collect` too)
    assert main(["sweep", "--config", sweep, "out=x", "--no-wait", "bogus.key=2"]) == 2
    assert "(bogus: override bogus.key=2)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["plan", "--config", config, "--model", "7b", "--bogus"])
    err = capsys.readouterr().err
    assert "usage: avar plan" in err and "unrecognized arguments: --bogus" in err


def test_validate_names_a_record_whose_image_fails_to_decode(tmp_path, capsys, monkeypatch):
    """Found in review: an image that passed the load's check yet failed to decode (a truncated GIF, before the
    load decoded GIFs) was decoded outside validate's error handling: a raw traceback instead of the record's id."""
    from megatron_avar.data import conversations

    out = tmp_path / "toy"
    assert main(["data", "generate", "--out", str(out), "--num-samples", "2"]) == 0
    image = sorted((out / "images").iterdir())[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(conversations, "verify_image", lambda source, where: "PNG")  # the load's check passes it
    capsys.readouterr()
    assert main(["data", "validate", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 records cannot be rendered" in err and "Traceback" not in err


def test_the_readme_example_dataset_validates(capsys):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples" / "data" / "format_examples.jsonl"
    assert main(["data", "validate", str(examples)]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 4


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Found in review: Ctrl-C in `avar sft` printed a 66-line traceback ending in KeyboardInterrupt."""
    import argparse

    import megatron_avar.cli as cli

    real_build = cli.build_parser

    def interrupted(args):
        raise KeyboardInterrupt

    def build_parser():
        parser = real_build()
        (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for sub in subcommands.choices.values():
            sub.set_defaults(handler=interrupted)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    assert main(["sft", "--config", "c.yaml"]) == 130
    error = capsys.readouterr().err
    assert error.strip() == ("avar sft: interrupted (a training run saves a checkpoint and stops after its step on "
                             "SIGUSR1 or SIGTERM to its ranks: scancel --batch --signal=USR1 JOBID under Slurm)")
    assert main(["plan", "--config", "c.yaml"]) == 130 and capsys.readouterr().err.strip() == "avar plan: interrupted"


_EARLY_SIGNAL = """
import os, signal, sys
from megatron_avar import cli
from megatron_avar.sft import cli as sft_cli

def handler(args):
    os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the trainer imports torch, before its PreemptionFlag
    from megatron_avar.training.checkpointing import PreemptionFlag
    print("received", PreemptionFlag().received, flush=True)
    return 0

sft_cli._run = handler
before = signal.getsignal(signal.SIGUSR1)
code = cli.main(["sft", "--config", "run.yaml"])
print("restored", signal.getsignal(signal.SIGUSR1) is before, "exit", code, flush=True)
os.kill(os.getpid(), signal.SIGUSR1)  # the caller's own handling again (the default: die)
print("survived")
"""


def test_a_stop_signal_during_the_training_commands_start_up_is_held_for_the_trainer():
    """Found in review on a real Slurm: a USR1 (the time-limit warning) or SIGTERM in the seconds a rank spends
    importing torch and megatron-core, before the trainer's PreemptionFlag, killed it without a checkpoint.
    `avar sft` / `avar grpo` hold them from their first line; the trainer honours one that came; the handlers of
    an in-process caller are put back when the command returns."""
    result = subprocess.run([sys.executable, "-c", _EARLY_SIGNAL], capture_output=True, text=True, timeout=300)
    assert result.stdout.splitlines() == ["received SIGUSR1", "restored True exit 0"], result.stdout + result.stderr
    assert result.returncode == -10  # SIGUSR1 after main: as before it


def test_a_training_run_folder_given_as_a_model_or_checkpoint_is_named_with_the_fix(tmp_path, capsys):
    """Found in review: a run's folder (or its checkpoints/) given to `avar convert mcore-to-hf` was "not a checkpoint
    written by `avar convert`", to `avar vas` a model with "model_type None"; a checkpoint given as model.hf_path
    had "no config.json". Each names what was given and the fix, with the newest checkpoint's path."""
    run = tmp_path / "run"
    newest = run / "checkpoints" / "step_00000003"
    newest.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    (run / "config.json").write_text("{}")  # the trainer's resolved config, not a model's
    (newest / "avar_checkpoint.json").write_text("{}")
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": []}\n')
    export = f"(avar convert mcore-to-hf --mcore-path {newest} --out DIR) and give DIR"
    for argv, message in (
            (["convert", "mcore-to-hf", "--mcore-path", str(run), "--out", str(tmp_path / "o")],
             f"{run} is a training run's folder, not a checkpoint: give one of its checkpoints, e.g. the newest, "
             f"{newest}"),
            (["convert", "mcore-to-hf", "--mcore-path", str(run / "checkpoints"), "--out", str(tmp_path / "o")],
             f"{run / 'checkpoints'} is a training run's checkpoints folder, not a checkpoint"),
            (["vas", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "v")],
             f"--model {run} is a training run's folder, not a checkpoint: give one of its checkpoints"),
            (["intervene", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "i.json")],
             f"--model {run} is a training run's folder, not a Hugging Face model folder: export its newest "
             f"checkpoint {export}"),
            (["sft", "--config", "examples/sft/quickstart.yaml", f"model.hf_path={newest}", f"data.path={data}",
              f"out={tmp_path / 's'}"],
             f"model.hf_path={newest} is a megatron checkpoint: export it {export}")):
        capsys.readouterr()
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert message in error, error
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_a_megatron_lm_checkpoint_is_told_apart_from_ours_and_from_a_model_folder(tmp_path, capsys):
    """One predicate (convert.checkpoint.is_megatron_checkpoint) for every command that takes a model folder. Found
    in review: three detectors disagreed: a Megatron-LM checkpoint (tracker file, iter_* folders) given to `avar
    vas` or as model.hf_path was "no config.json", and the export the others advised then failed on it."""
    foreign = tmp_path / "megatron-lm"
    (foreign / "iter_0000010").mkdir(parents=True)
    (foreign / "latest_checkpointed_iteration.txt").write_text("10\n")
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": []}\n')
    told = f"{foreign} is a Megatron-LM checkpoint that megatron_avar did not write (it has no avar_checkpoint.json"
    for argv, prefix in (
            (["convert", "mcore-to-hf", "--mcore-path", str(foreign), "--out", str(tmp_path / "o")], ""),
            (["vas", "--model", str(foreign), "--data", str(data), "--out", str(tmp_path / "v")], ""),
            (["intervene", "--model", str(foreign), "--data", str(data), "--out", str(tmp_path / "i.json")],
             "--model "),
            (["sft", "--config", "examples/sft/quickstart.yaml", f"model.hf_path={foreign}", f"data.path={data}",
              f"out={tmp_path / 's'}"], "model.hf_path=")):
        capsys.readouterr()
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert prefix + told in error, (argv[0], error)
        assert "give the Hugging Face model it came from" in error
    assert not any((tmp_path / name).exists() for name in ("o", "v", "i.json", "s"))
