#!/bin/bash
# AVAR GRPO of Qwen2.5-VL-72B (examples/grpo/avar_72b.yaml): 8 nodes x 8 H200, TP=8 (within a node, SP) x DP=8,
# vLLM colocated with TP=8 (PP=1; the memory arithmetic is in the config). Same launcher, knobs and preemption
# handling as slurm/avar_grpo_7b.sh (slurm/lib/launch.sh).
#
# H200 nodes only: on 80 GB H100s this layout does not fit (`avar plan --config examples/grpo/avar_72b.yaml
# --model 72b --gpus 64`: short by ~16 GB at the rollout). --gpus-per-node=8 asks for any GPU; select H200 nodes
# the way your cluster names them (--partition, --constraint, or --gpus-per-node=h200:8), on the command line.
#
#   sbatch slurm/avar_grpo_72b.sh [dotted.overrides ...]
#   sbatch --nodes=16 slurm/avar_grpo_72b.sh train.prompts_per_step=512     # DP=16
#SBATCH --job-name=avar-grpo-72b
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

: "${CONFIG:=examples/grpo/avar_72b.yaml}"
: "${RUN_DIR:=runs/avar_grpo_72b}"
SUBCOMMAND=grpo
export CONFIG RUN_DIR SUBCOMMAND
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/launch.sh" "$@"
