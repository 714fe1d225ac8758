#!/bin/bash
# AVAR cold-start SFT of Qwen2.5-VL-72B (examples/sft/avar_72b.yaml): 8 nodes x 8 H100, TP=8 (within a node,
# sequence parallel) x PP=4 x DP=2, full recompute, one rank per GPU started by srun. Same launcher, knobs and
# preemption handling as slurm/avar_sft_7b.sh (see slurm/lib/launch.sh); more nodes give more data parallelism:
# DP = nodes x 8 / 32, which must divide train.global_batch_size (128): 4, 8, 16, 32 or 64 nodes.
#
#   sbatch slurm/avar_sft_72b.sh [dotted.overrides ...]
#   sbatch --nodes=16 slurm/avar_sft_72b.sh          # DP=4
#SBATCH --job-name=avar-sft-72b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

: "${CONFIG:=examples/sft/avar_72b.yaml}"
: "${RUN_DIR:=runs/avar_sft_72b}"
export CONFIG RUN_DIR
# sbatch runs a copy of this file from its spool directory: find the repo through the submit directory.
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/launch.sh" "$@"
