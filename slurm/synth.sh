#!/bin/bash
# AVAR data synthesis on a Slurm allocation: one Ray cluster across the nodes, vLLM teacher servers on
# every node, then `avar synth` on the head node (NeMo Curator schedules the stages over the Ray cluster).
#
#   sbatch --nodes=4 slurm/synth.sh examples/synth/vard_cluster.yaml [dotted.overrides ...]
#
# Teachers: every node serves the models in VLLM_MODELS, each entry MODEL@PORT@GPU_LIST, started with
# tensor parallelism over its GPUs. Stage workers reach "their" node's servers at http://localhost:PORT/v1,
# which is what the config's teacher base_urls say: requests never cross nodes, and the pipeline's
# throughput grows with the node count. The request cache is keyed by model, not URL, so every node's
# answers land in one shared cache (work_dir must be on a filesystem all nodes see).
#
# Resume: re-submitting the same command resumes an unfinished run without repeating any teacher request
# already answered (see megatron_avar/synth/pipeline.py).
#
# Teachers served elsewhere (a hosted API, servers of your own): VLLM_MODELS= (empty) starts no server and waits
# for none; the config's base_urls point at those teachers.
#
# Environment knobs (defaults below): VLLM_MODELS, VLLM_ARGS (extra `vllm serve` flags), RAY_PORT,
# RAY_ARGS (extra `ray start` flags on every node, e.g. --num-cpus=N: each pipeline stage holds a CPU),
# VENV (the Python environment with `pip install -e .[synth,gpu]`), SERVER_WAIT_S.
#SBATCH --job-name=avar-synth
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
# Slurm >= 23.11 no longer hands sbatch's --cpus-per-task to srun: without this each step below (the teacher servers,
# the Ray nodes) would be bound to one core.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

CONFIG=${1:?usage: sbatch slurm/synth.sh CONFIG.yaml [dotted.overrides ...]}
shift
OVERRIDES=("$@")
VLLM_MODELS=${VLLM_MODELS-"Qwen/Qwen2.5-VL-72B-Instruct@8000@0,1,2,3 Qwen/Qwen3-32B@8001@4,5,6,7"}
VLLM_ARGS=${VLLM_ARGS:-"--max-model-len 32768 --gpu-memory-utilization 0.90"}
RAY_PORT=${RAY_PORT:-6379}
RAY_ARGS=${RAY_ARGS:-}
SERVER_WAIT_S=${SERVER_WAIT_S:-1800}
VENV=${VENV:-$PWD/.venv}
# shellcheck disable=SC1091
source "$VENV/bin/activate"
mkdir -p logs  # the teacher servers' logs (the job's own goes to slurm-%x-%j.out: Slurm opens it before this line)

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun --nodes=1 --ntasks=1 --overlap -w "$HEAD" hostname --ip-address | awk '{print $1}')
export RAY_ADDRESS="$HEAD_IP:$RAY_PORT"
# Ray's token authentication, one token per job (in the environment of every step, the stage workers and the
# driver). Left to itself, Ray (2.60) turns it on in `ray start` when ~/.ray/auth_token exists (any earlier local
# `ray.init()` writes one) but not in a driver given an explicit RAY_ADDRESS, which the cluster then refuses.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(32))')}
export RAY_AUTH_TOKEN
# scancel: each node's Ray stops at once on Slurm's SIGTERM, instead of first draining for up to 30 s (for Ray Serve
# replicas, which this job has none of) until Slurm's SIGKILL.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
echo "[synth] nodes: ${NODES[*]}; ray head $RAY_ADDRESS; teachers per node: ${VLLM_MODELS:-none (served elsewhere)}"

cleanup() {
    # Stop this job's steps on every node (at the end and on failure; on scancel Slurm does it): each srun ends
    # its step, and with it every process the step started: the vLLM servers, `ray start --block` and its Ray
    # processes. Not `ray stop`: it stops every Ray instance of the user on the node, other jobs' too wherever
    # nodes are shared.
    kill $(jobs -p) 2>/dev/null || true
    wait || true
    echo "[synth] ray cluster and teacher servers stopped"
}
trap cleanup EXIT

# 1. Teacher servers: one srun step on all nodes; each task starts the node's servers and waits on them. A server
#    runs until the job ends, so one that exits (a failed start: CUDA OOM, a wrong model name) ends its task with a
#    non-zero status, and --kill-on-bad-exit the step; step 3 then stops waiting. The Ray workers use no GPU
#    (num-gpus 0 below), so the GPUs belong to vLLM.
SERVER_LOGS="logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}-vllm-<node>.out"
if [[ -n $VLLM_MODELS ]]; then
    srun --nodes="${#NODES[@]}" --ntasks-per-node=1 --overlap --kill-on-bad-exit=1 \
        --output="logs/%x-%j-vllm-%N.out" bash -c '
        for entry in '"$VLLM_MODELS"'; do
            IFS=@ read -r model port gpus <<< "$entry"
            tp=$(awk -F, "{print NF}" <<< "$gpus")
            CUDA_VISIBLE_DEVICES=$gpus vllm serve "$model" --port "$port" --tensor-parallel-size "$tp" \
                '"$VLLM_ARGS"' &
        done
        wait -n; status=$?
        echo "[synth] a teacher server on $(hostname) exited (status $status); stopping the others" >&2
        kill $(jobs -p) 2>/dev/null; wait  # (not left to Slurm: proctrack/linuxproc loses orphaned processes)
        exit $(( status ? status : 1 ))' &
    SERVER_STEP=$!
fi

# 2. Ray: the head, then one worker per other node. --block keeps each step alive for the whole job.
srun --nodes=1 --ntasks=1 --overlap -w "$HEAD" \
    ray start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-gpus=0 $RAY_ARGS --block &
ray_deadline=$((SECONDS + 180))  # the head answers in seconds; workers need it up to join
until ray status --address="$RAY_ADDRESS" >/dev/null 2>&1; do
    (( SECONDS < ray_deadline )) || { echo "[synth] the Ray head on $HEAD did not answer within 180 s"; exit 1; }
    sleep 2
done
for node in "${NODES[@]:1}"; do
    srun --nodes=1 --ntasks=1 --overlap -w "$node" \
        ray start --address="$RAY_ADDRESS" --num-gpus=0 $RAY_ARGS --block &
done

# 3. Wait until every node's servers answer (model loading takes minutes), or the server step has ended (step 1).
deadline=$((SECONDS + SERVER_WAIT_S))
for entry in $VLLM_MODELS; do
    IFS=@ read -r _ port _ <<< "$entry"
    until srun --nodes="${#NODES[@]}" --ntasks-per-node=1 --overlap \
            curl -sf "http://localhost:$port/v1/models" >/dev/null 2>&1; do
        if ! kill -0 "$SERVER_STEP" 2>/dev/null; then
            status=0; wait "$SERVER_STEP" || status=$?
            echo "[synth] the teacher server step ended (status $status) before port $port served: see $SERVER_LOGS"
            exit 1
        fi
        (( SECONDS < deadline )) || { echo "[synth] servers on port $port not up after ${SERVER_WAIT_S}s"; exit 1; }
        for _ in {1..20}; do kill -0 "$SERVER_STEP" 2>/dev/null || break; sleep 1; done  # 20 s, or until it ends
    done
    echo "[synth] port $port serving on all nodes"
done

# 4. The pipeline, driven from the head node; RAY_ADDRESS makes it join the cluster (and leave it running:
#    cleanup stops it). API keys of hosted teachers come from the environment variables the config names:
#    export them before sbatch (Slurm passes the environment to the job, and `ray start` above passes it to
#    the stage workers); never put a key in the config.
python -m megatron_avar synth --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"}  # (bash < 4.4: no overrides)
