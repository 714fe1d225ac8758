"""What the fault tests share (a module with a unique name, imported by the test modules of this folder): the
`avar sft` command line of a small 2-step run that checkpoints after every step, and cheap copies of its run
directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "sft"))  # the shared tiny SFT settings (tests/sft)
from sft_cases import sft_overrides  # noqa: E402

REPO = Path(__file__).parents[2]
BASE_SETTINGS = {"train.steps": 2, "train.global_batch_size": 2, "checkpoint.interval": 1,
                 "parallel.tensor_model_parallel_size": 1}


def sft_command(out: Path, sft_inputs, **extra) -> list[str]:
    return [sys.executable, "-m", "megatron_avar", "sft", "--config", "examples/sft/quickstart.yaml",
            *sft_overrides(sft_inputs, out, **{**BASE_SETTINGS, **extra})]


def run_sft(out: Path, sft_inputs, *, env: dict | None = None, **extra) -> subprocess.CompletedProcess:
    """`avar sft` to completion (or failure), its output captured."""
    return subprocess.run(sft_command(out, sft_inputs, **extra), cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=None if env is None else {**os.environ, **env})


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def _link_or_copy(src, dst):
    # The multi-MB tensor files are never written in place: hard links keep the copies cheap.
    if src.endswith(".distcp"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def copy_run(base: Path, dest: Path, *, latest_step: int | None = None) -> Path:
    """A copy of the base run; with latest_step, as if it had stopped (preempted) after that step."""
    shutil.copytree(base, dest, copy_function=_link_or_copy)
    if latest_step is not None:
        checkpoints = dest / "checkpoints"
        for folder in checkpoints.glob("step_*"):
            if int(folder.name.split("_")[1]) > latest_step:
                shutil.rmtree(folder)
        (checkpoints / "latest").write_text(f"step_{latest_step:08d}\n")
    return dest


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss/lm"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def two_ranks(command: list[str], *, env: dict | None = None) -> list[tuple[int, str]]:
    """Run ``command`` as 2 ranks, launched as torchrun launches them: its environment variables (plus ``env``), and
    the rendezvous store hosted here, as by torchrun's agent (the ranks connect to it as clients). The OS picks the
    store's port while binding it: a port probed free and released for rank 0 to bind could be taken in between.
    (exit code, stdout and stderr together) of each."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True,  # pyright: ignore[reportPrivateImportUsage]
                          wait_for_workers=False)
    ranks = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                                   "TORCHELASTIC_USE_AGENT_STORE": "True"})
             for rank in range(2)]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    return [(rank.returncode, text) for rank, text in zip(ranks, outputs)]


def on_two_ranks(command: list[str]) -> list[str]:
    """Run ``command`` as 2 ranks (:func:`two_ranks`); both must succeed. Returns their outputs."""
    done = two_ranks(command)
    assert [code for code, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    return [text for _, text in done]


def exports_and_verifies(checkpoint: Path, hf: Path) -> None:
    """`avar convert mcore-to-hf` of ``checkpoint`` into ``hf``, then `avar convert verify` (equal logits), through
    the command line's own entry point in this process (`python -m megatron_avar` is ``SystemExit(main())``; the
    conversion runs on its own ranks either way): no interpreter start-up per command."""
    from megatron_avar.cli import main

    for args in (["mcore-to-hf", "--mcore-path", str(checkpoint), "--out", str(hf)],
                 ["verify", "--hf-path", str(hf), "--mcore-path", str(checkpoint)]):
        assert main(["convert", *args]) == 0, f"avar convert {args[0]} failed: its output is in the captured stderr"
