#!/bin/bash
# The shared body of slurm/avar_sft_*.sh and slurm/avar_grpo_*.sh: sourced by them inside the batch job,
# after they set their defaults. Launches `avar $SUBCOMMAND` (sft or grpo) with one rank per GPU (srun
# starts the ranks directly: no torchrun, so a
# signal sent to the step reaches every rank), handles preemption and the time limit by checkpointing and
# requeueing, and keeps everything a run needs to be understood later in its run directory.
#
# Environment (set with `sbatch --export=ALL,NAME=value ...` or exported before sbatch):
#   SUBCOMMAND      the avar training subcommand: sft (default) or grpo (the calling script sets it)
#   CONFIG          its YAML config (the calling script sets a default)
#   RUN_DIR         the run directory; passed to the trainer as out=RUN_DIR (the calling script sets a default)
#   OVERRIDES       extra dotted overrides, space separated (e.g. "optim.lr=1e-5 train.steps=600"); the
#                   batch script's own arguments are appended: `sbatch slurm/avar_sft_7b.sh optim.lr=1e-5`
#                   (pass values with commas, e.g. avar.layers=[8,9,10], as arguments or `export` them:
#                   sbatch's --export=NAME=value list splits at commas)
#   NPROC_PER_NODE  ranks per node (default: sbatch's --ntasks-per-node, i.e. one per GPU)
#   PYTHON          the interpreter (default: $VENV/bin/python if VENV is set, else <repo>/.venv/bin/python
#                   if it exists (outside a container), else python3 (`python` inside a container))
#   CONTAINER       optional container image for the ranks (pyxis: srun --container-image), with the repo as
#                   working directory and CONTAINER_MOUNTS (default: the repo, RUN_DIR and VENV, each at its
#                   own path; set it to add the model and data folders when they lie elsewhere). Each srun
#                   starts a fresh container: the image holds the dependencies, or VENV is one on a mounted path
#   MASTER_PORT     rendezvous port (default: 15000 + job id mod 20000, so jobs sharing a node differ)
#   MAX_REQUEUES    how many times the job requeues itself after a USR1 (default 20); an attempt that wrote no
#                   new checkpoint is not requeued (the next one would start where it did)
#   SRUN_ARGS       extra srun options (e.g. "--cpu-bind=none")
#   REPO            the repository (default: the directory sbatch was called from)
#
# Preemption / time limit: the calling script asks for `--signal=B:USR1@S` (USR1 to this batch shell S
# seconds before the time limit; `scancel --batch --signal=USR1 JOBID` sends it by hand). The trap below
# forwards it to the srun step, every rank finishes its current step, writes a checkpoint
# (<RUN_DIR>/checkpoints/latest) and exits 0; then this script requeues the job (same job id, log
# appended), and the requeued job's identical command resumes from that checkpoint. A SIGTERM to this shell
# (`scancel --batch --signal=TERM`, preemption) is passed on the same way, as USR1 (srun answers a SIGTERM by
# killing the step: the ranks would write no checkpoint; they stop alike on either signal), so the ranks
# checkpoint within KillWait, but never requeues by itself: Slurm decides whether a preempted job comes back.

set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
: "${SUBCOMMAND:=sft}"
case "$SUBCOMMAND" in sft|grpo) ;; *) echo "SUBCOMMAND=$SUBCOMMAND: allowed sft, grpo" >&2; exit 2;; esac
: "${CONFIG:?set CONFIG to an avar $SUBCOMMAND YAML config}"
: "${RUN_DIR:?set RUN_DIR to the run directory}"
: "${SLURM_JOB_ID:?run this through sbatch}"
OVERRIDES=${OVERRIDES:-}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
MAX_REQUEUES=${MAX_REQUEUES:-20}
RESTARTS=${SLURM_RESTART_COUNT:-0}
SRUN_ARGS=${SRUN_ARGS:-}
if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VENV:-}" ]; then PYTHON=$VENV/bin/python
    elif [ -n "${CONTAINER:-}" ]; then PYTHON=python
    elif [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python
    else PYTHON=python3; fi
fi

mkdir -p "$RUN_DIR"
LOG=$RUN_DIR/slurm-$SLURM_JOB_ID.out
echo "[avar-slurm] job $SLURM_JOB_ID: logging to $LOG"
exec >>"$LOG" 2>&1   # this shell and the ranks, appended across requeues (same job id)
log() { echo "[avar-slurm $(date -u +%FT%TZ)] $*"; }

# Rendezvous: the first host of the allocation; a port derived from the job id (stable across requeues).
# (sed reads the whole list: `head -n 1` would close the pipe early, and under pipefail scontrol's SIGPIPE on a
# long node list failed the job)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron's TP comm/compute ordering
export PYTHONUNBUFFERED=1

override_args=()
read -r -a override_args <<< "$OVERRIDES"
# (${a[@]+"${a[@]}"}: an empty array under `set -u` is an error in bash < 4.4, e.g. RHEL 7's 4.2)
COMMAND=("$PYTHON" -m megatron_avar "$SUBCOMMAND" --config "$CONFIG" "out=$RUN_DIR"
         ${override_args[@]+"${override_args[@]}"} "$@")
SRUN=(srun --nodes="$NNODES" --ntasks-per-node="$NPROC_PER_NODE" --ntasks=$((NNODES * NPROC_PER_NODE))
      --kill-on-bad-exit=1 --label)
# Slurm >= 23.11 no longer hands sbatch's --cpus-per-task to srun: pass it on, or each rank gets one core.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
if [ -n "${CONTAINER:-}" ]; then
    # The ranks see only what is mounted: a RUN_DIR (or VENV) outside the repo, unmounted, would be written inside
    # the container's throwaway file system, its checkpoints lost with it.
    mounts=$REPO:$REPO
    for path in "$RUN_DIR" "${VENV:-}"; do
        if [ -z "$path" ] || [ ! -d "$path" ]; then continue; fi
        path=$(cd "$path" && pwd)
        case "$path/" in "$REPO"/*) continue;; esac  # in the repo, mounted with it
        mounts=$mounts,$path:$path
    done
    SRUN+=(--container-image="$CONTAINER" --container-mounts="${CONTAINER_MOUNTS:-$mounts}"
           --container-workdir="$REPO")
fi
extra_srun=()
read -r -a extra_srun <<< "$SRUN_ARGS"
SRUN+=(${extra_srun[@]+"${extra_srun[@]}"})

# What this job ran with: the config as given (the trainer writes the resolved one to config.json), the
# command and the Slurm environment, in files named by the job id: a second job on this RUN_DIR (refused by
# the trainer when the run is in use or finished) never replaces the record of the first.
cp "$CONFIG" "$RUN_DIR/config-input-$SLURM_JOB_ID.yaml"
{
    echo "# job $SLURM_JOB_ID attempt $RESTARTS, $(date -u +%FT%TZ), $(hostname)"
    echo "# command: ${SRUN[*]} ${COMMAND[*]}"
    env | grep -E '^(SLURM_|SBATCH_|MASTER_|CUDA_|NCCL_|OMP_|CONFIG=|RUN_DIR=|OVERRIDES=|PYTHON=|CONTAINER=|CONTAINER_MOUNTS=)' | sort
} >>"$RUN_DIR/slurm-$SLURM_JOB_ID.env"
log "job $SLURM_JOB_ID attempt $RESTARTS on $SLURM_JOB_NODELIST: $NNODES node(s) x $NPROC_PER_NODE ranks," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT"
log "command: ${COMMAND[*]}"

STOP_SIGNAL=""
SRUN_PID=""
latest_checkpoint() { cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || true; }
LATEST_BEFORE=$(latest_checkpoint)
forward() {
    STOP_SIGNAL=$1
    log "received SIG$1: asking the ranks to checkpoint and stop"
    # USR1 either way: srun passes USR1 on to every rank, but answers a TERM by killing the step
    if [ -n "$SRUN_PID" ]; then kill -s USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${SRUN[@]}" "${COMMAND[@]}" &
SRUN_PID=$!
while :; do
    rc=0
    wait "$SRUN_PID" || rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break  # still alive: wait was interrupted by a trapped signal
done
# srun may have ended during the trap that interrupted the last wait (rc > 128 is then that wait's, not srun's,
# and a finished run would be requeued): wait once more for srun's own status
if [ "$rc" -gt 128 ]; then rc=0; wait "$SRUN_PID" || rc=$?; fi
log "ranks exited with status $rc"

if [ "$STOP_SIGNAL" = USR1 ]; then
    if [ "$rc" -eq 0 ] && grep -q '"stopped_by": null' "$RUN_DIR/summary.json" 2>/dev/null; then
        log "training finished before the signal took effect: not requeueing"
    elif [ "$(latest_checkpoint)" = "$LATEST_BEFORE" ]; then
        # (a time limit shorter than the signal's lead, or a stop before the first step: every attempt would
        # end the same way)
        log "this attempt wrote no new checkpoint (checkpoints/latest: ${LATEST_BEFORE:-none}): not requeueing," \
            "since the next attempt would start where this one did. If the signal came at the start, the job's" \
            "--time must exceed the --signal=B:USR1@SECONDS lead by the time a step and a checkpoint take"
        exit 1
    elif [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
        log "already requeued $RESTARTS times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing"; exit 1
    else
        log "requeueing job $SLURM_JOB_ID (attempt $((RESTARTS + 1))); it resumes from $RUN_DIR/checkpoints"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
fi
exit "$rc"
