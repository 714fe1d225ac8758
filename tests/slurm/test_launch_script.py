"""slurm/lib/launch.sh (through slurm/avar_sft_7b.sh) with stand-ins for srun and scontrol: what the batch shell
decides, in seconds and without a cluster (tests/slurm/test_slurm_sft.py runs the same script on a real Slurm).

The stand-in srun records its command line, sends USR1 to the batch shell (the time-limit warning), and on the
USR1 the shell forwards to it, exits 0 as ranks that stopped do: with a new checkpoint or, like ranks stopped
before their first step, without one."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[2]

_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$SHIM_DIR/srun.args"
stop() {
    if [ "$FAKE_CHECKPOINT" = 1 ]; then
        mkdir -p "$RUN_DIR/checkpoints" && echo step_00000009 > "$RUN_DIR/checkpoints/latest"
    fi
    exit 0
}
trap stop USR1
kill -USR1 "$PPID"
for _ in $(seq 300); do sleep 0.1; done
exit 3
"""
_SCONTROL = """#!/bin/bash
case "$1" in
    show) echo node1;;
    requeue) echo "$2" >> "$SHIM_DIR/requeued";;
esac
"""


def _submit(tmp_path: Path, *, checkpoint: bool, run_dir: Path | None = None, **env) -> tuple[int, str, Path]:
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    for name, text in (("srun", _SRUN), ("scontrol", _SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    run_dir = run_dir or tmp_path / "run"
    environment = {"PATH": f"{shims}:{os.environ['PATH']}", "HOME": str(tmp_path), "SHIM_DIR": str(shims),
                   "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(REPO),
                   "CONFIG": "examples/sft/slurm_tiny.yaml", "RUN_DIR": str(run_dir), "PYTHON": "python3",
                   "FAKE_CHECKPOINT": "1" if checkpoint else "0", **env}
    done = subprocess.run(["bash", str(REPO / "slurm" / "avar_sft_7b.sh")], env=environment, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, (run_dir / "slurm-77.out").read_text(), shims


def test_a_stopped_attempt_with_a_new_checkpoint_requeues(tmp_path):
    code, log, shims = _submit(tmp_path, checkpoint=True)
    assert code == 0, log
    assert "requeueing job 77 (attempt 1)" in log
    assert (shims / "requeued").read_text().split() == ["77"]


def test_a_stopped_attempt_without_a_new_checkpoint_is_not_requeued(tmp_path):
    """Found in review on a real Slurm: a job whose --time was shorter than its --signal=B:USR1@600 lead got the
    signal at the start of every attempt, wrote nothing, and requeued itself up to MAX_REQUEUES times."""
    code, log, shims = _submit(tmp_path, checkpoint=False)
    assert code == 1, log
    assert "this attempt wrote no new checkpoint (checkpoints/latest: none): not requeueing" in log
    assert not (shims / "requeued").exists()
    # an earlier checkpoint that this attempt did not advance counts as none new
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    code, log, _ = _submit(tmp_path, checkpoint=False, SLURM_RESTART_COUNT="1")
    assert code == 1 and "(checkpoints/latest: step_00000004): not requeueing" in log
    assert not (shims / "requeued").exists()


def test_a_container_sees_the_run_directory_and_runs_the_venvs_python(tmp_path):
    """Found in review: with CONTAINER set the ranks ran the image's `python` even with VENV given, and only the
    repo was mounted: a RUN_DIR elsewhere was written inside the throwaway container, its checkpoints lost."""
    venv, run = tmp_path / "venv", tmp_path / "scratch" / "run"
    venv.mkdir()
    env = {"CONTAINER": "nvcr.io/nvidia/pytorch:25.01-py3", "VENV": str(venv), "PYTHON": "",
           "OVERRIDES": "", "SRUN_ARGS": ""}
    code, log, shims = _submit(tmp_path, checkpoint=True, run_dir=run, **env)
    assert code == 0, log
    args = (shims / "srun.args").read_text().splitlines()
    assert f"--container-mounts={REPO}:{REPO},{run}:{run},{venv}:{venv}" in args
    assert args[args.index(f"--container-workdir={REPO}") + 1:][:3] == [f"{venv}/bin/python", "-m", "megatron_avar"]
