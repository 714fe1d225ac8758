#!/bin/bash
# AVAR GRPO of Qwen2.5-VL-7B (examples/grpo/avar_7b.yaml): 1 node x 8 H100, TP=2 (SP) x DP=4, vLLM colocated in
# the trainer's ranks (one rank per GPU started by srun). Same launcher, knobs and preemption handling as
# the SFT scripts (slurm/lib/launch.sh): USR1 ten minutes before the time limit -> checkpoint -> requeue ->
# resume. A CPU smoke test on one node with the local backend:
#   sbatch --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --mem=8G --time=15 --signal=B:USR1@30 \
#     --export=ALL,CONFIG=examples/grpo/tiny.yaml,RUN_DIR=runs/grpo_slurm_tiny slurm/avar_grpo_7b.sh \
#     model.hf_path=... data.path=...
#
#   sbatch slurm/avar_grpo_7b.sh [dotted.overrides ...]
#SBATCH --job-name=avar-grpo-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

: "${CONFIG:=examples/grpo/avar_7b.yaml}"
: "${RUN_DIR:=runs/avar_grpo_7b}"
SUBCOMMAND=grpo
export CONFIG RUN_DIR SUBCOMMAND
# vLLM shares the ranks' process group (external launcher): no Ray, no extra processes.
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/launch.sh" "$@"
