"""Where `init_distributed` takes its ranks from: torchrun's variables, an srun step's, or a single process. A
batch script (or an salloc shell) also has SLURM_PROCID=0 and the allocation's SLURM_NTASKS, yet runs one
process: it used to ask for MASTER_ADDR, or, with it set, wait for ranks nobody starts. Whatever launched the
process, torchrun's RANK / WORLD_SIZE / LOCAL_RANK hold its place afterwards: vLLM's external_launcher reads them
(an srun-launched GRPO run with vLLM rollouts stopped on a KeyError before)."""

import json
import os
import subprocess
import sys
from pathlib import Path

_PROBE = ("import json; from megatron_avar.training.megatron_setup import init_distributed; "
          "import os; layout = init_distributed(1, 1, seed=0); "
          "print(json.dumps([layout.rank, layout.world_size, [os.environ.get(name) for name in "
          "('RANK', 'WORLD_SIZE', 'LOCAL_RANK')]]))")


def _ranks(**env) -> tuple[int, list | str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                         "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2])
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 \
        else done.stderr[-1500:]


def test_one_process_in_a_batch_script_runs_alone():
    assert _ranks(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_LOCALID="0") == \
        (0, [0, 1, ["0", "1", "0"]])


def test_an_srun_step_leaves_torchruns_variables_for_the_libraries_that_read_them():
    assert _ranks(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_LOCALID="0",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT="0") == (0, [0, 1, ["0", "1", "0"]])


def test_a_one_task_srun_step_runs_alone_without_a_rendezvous():
    """Found in review: `srun -n1 avar sft ...` (or a run in `srun --pty bash`) asked for MASTER_ADDR, which the
    same command outside Slurm does not need."""
    assert _ranks(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1",
                  SLURM_LOCALID="0") == (0, [0, 1, ["0", "1", "0"]])


def test_an_srun_step_without_a_rendezvous_is_told_to_set_one():
    code, error = _ranks(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                         SLURM_LOCALID="0")
    assert code != 0 and "MASTER_ADDR is not set" in error


def test_a_bad_rank_variable_or_port_is_named():
    """Found in review: `RANK=x` gave "invalid literal for int() with base 10: 'x'" and MASTER_PORT=99999 "port must
    have value from 0 to 65535 but was 99999.", naming neither variable."""
    code, error = _ranks(RANK="x", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    assert code != 0 and "RANK='x' is not a rank number (an int >= 0); fix or unset RANK" in error
    code, error = _ranks(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1", SLURM_LOCALID="0",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT="99999")
    assert code != 0 and "MASTER_PORT='99999' is not a port (0-65535)" in error
