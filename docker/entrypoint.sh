#!/bin/sh
# Entrypoint of the trainyard images.
#
#   worker [ARGS...]   poll the Prefect work pool $POOL (default: cpu) and run its flow runs
#                      as subprocesses; ARGS go to `prefect worker start`
#   train  [ARGS...]   run one training flow and exit: `trainyard train ARGS...`
#   anything else      run as given, e.g. `prefect flow-run execute` (the command that
#                      Docker and Kubernetes work pools start), `prefect server start`,
#                      `mlflow server ...`, `sh`
#
# Worker settings (environment):
#   POOL                 work pool to poll (default: cpu)
#   WORKER_TYPE          worker type (default: process)
#   WORKER_LIMIT         most flow runs at once in this worker (default: no limit)
#   WORKER_NAME          worker name shown in the Prefect UI (default: $POOL-<container hostname>)
#   TRAINYARD_GPU_CLAIM  1: before starting, claim one GPU that no other worker sharing
#                        TRAINYARD_GPU_LOCK_DIR holds, and pin this worker and its flow
#                        runs to it with CUDA_VISIBLE_DEVICES (see claim_gpu below);
#                        0 (default): claim nothing, the worker and its flow runs see every
#                        GPU of the container (train.distributed.nproc_per_node=auto uses them all)
set -eu

ROLE_FILE=${TRAINYARD_ROLE_FILE:-/tmp/trainyard-role}

# Docker Compose gives every replica of a service the same GPU reservation, so
# `--scale gpu-worker=N` with `count: 1` would put all N workers on GPU 0. The GPU
# worker therefore reserves all GPUs and each replica takes one for itself: it holds an
# exclusive flock on $TRAINYARD_GPU_LOCK_DIR/gpuI.lock for I = 0, 1, ... (a volume shared
# by the replicas) for as long as it lives; file descriptor 9 stays open across the exec
# below, so the lock is released only when the worker process exits.
claim_gpu() {
    lock_dir=${TRAINYARD_GPU_LOCK_DIR:-/var/lib/trainyard-gpu-locks}
    count=${TRAINYARD_GPU_COUNT:-}
    if [ -z "$count" ]; then
        count=0
        for dev in /dev/nvidia[0-9]*; do
            [ -e "$dev" ] && count=$((count + 1))
        done
    fi
    case "$count" in
        '' | *[!0-9]*)
            echo "entrypoint: TRAINYARD_GPU_COUNT must be a whole number, got '$count'" >&2
            exit 64
            ;;
    esac
    if [ "$count" -eq 0 ]; then
        echo "entrypoint: TRAINYARD_GPU_CLAIM=1 but no GPU is visible (no /dev/nvidiaN device);" \
            "is the NVIDIA Container Toolkit installed and the GPU reserved for this container?" >&2
        exit 75
    fi
    mkdir -p "$lock_dir"
    i=0
    while [ "$i" -lt "$count" ]; do
        exec 9>"$lock_dir/gpu$i.lock"
        if flock -n 9; then
            CUDA_VISIBLE_DEVICES=$i
            CUDA_DEVICE_ORDER=PCI_BUS_ID
            export CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER
            echo "entrypoint: this worker uses GPU $i of $count" >&2
            return 0
        fi
        i=$((i + 1))
    done
    exec 9>&-
    echo "entrypoint: all $count GPUs are held by other workers (locks in $lock_dir);" \
        "this host takes no more GPU workers than it has GPUs" >&2
    exit 75
}

mode=${1:-worker}
[ "$#" -gt 0 ] && shift

case "$mode" in
    worker)
        pool=${POOL:-cpu}
        case "${TRAINYARD_GPU_CLAIM:-0}" in
            1) claim_gpu ;;
            0) ;;
            *)
                echo "entrypoint: TRAINYARD_GPU_CLAIM must be 1 (claim one GPU) or 0 (use all), got '$TRAINYARD_GPU_CLAIM'" >&2
                exit 64
                ;;
        esac
        set -- --pool "$pool" --type "${WORKER_TYPE:-process}" \
            --name "${WORKER_NAME:-$pool-$(uname -n)}" \
            --install-policy never --with-healthcheck "$@"
        if [ -n "${WORKER_LIMIT:-}" ]; then
            set -- --limit "$WORKER_LIMIT" "$@"
        fi
        { echo worker >"$ROLE_FILE"; } 2>/dev/null || true
        exec prefect worker start "$@"
        ;;
    train)
        { echo train >"$ROLE_FILE"; } 2>/dev/null || true
        exec trainyard train "$@"
        ;;
    *)
        exec "$mode" "$@"
        ;;
esac
