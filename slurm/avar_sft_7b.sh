#!/bin/bash
# AVAR cold-start SFT of Qwen2.5-VL-7B (examples/sft/avar_7b.yaml): 2 nodes x 8 H100, TP=2 (sequence parallel)
# x DP=8, full recompute, one rank per GPU started by srun.
#
#   sbatch slurm/avar_sft_7b.sh [dotted.overrides ...]
#   sbatch --export=ALL,RUN_DIR=runs/7b_lr1e-5 slurm/avar_sft_7b.sh optim.lr=1e-5
#
# The log, the Slurm environment and the config go to RUN_DIR (slurm-<jobid>.out, slurm-<jobid>.env,
# config-input-<jobid>.yaml; the trainer adds config.json, metrics.jsonl, summary.json, checkpoints/). Ten
# minutes before the time limit (or on `scancel --batch --signal=USR1 JOBID`) the ranks checkpoint and the job
# requeues itself; the same command then resumes. All knobs: slurm/lib/launch.sh. Every #SBATCH line
# below is a default that sbatch's own options override, e.g. a CPU smoke test on one node:
#   sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --mem=4G --time=10 \
#     --signal=B:USR1@30 --export=ALL,CONFIG=examples/sft/slurm_tiny.yaml,RUN_DIR=runs/slurm_tiny \
#     slurm/avar_sft_7b.sh model.hf_path=... data.path=...
#SBATCH --job-name=avar-sft-7b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

: "${CONFIG:=examples/sft/avar_7b.yaml}"
: "${RUN_DIR:=runs/avar_sft_7b}"
export CONFIG RUN_DIR
# sbatch runs a copy of this file from its spool directory: find the repo through the submit directory.
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/launch.sh" "$@"
